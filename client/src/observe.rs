//! Watching an election's leader.
//!
//! The server's `Observe` stream sends the current leader (confirmed by a
//! ReadIndex round, so it is not stale) and then every change as the
//! answering node applies it, in log order. When that stream breaks (the
//! node stopped or was cut off), the client opens a new one on another
//! node, with the usual leader-following and retries, and carries on.
//!
//! Across a reconnection the new stream starts with the leader *then*, so
//! changes that happened while no stream was open are summarised by the
//! latest state rather than replayed. What the caller sees is still in
//! order: a leader is delivered only if its token is higher than every
//! token delivered before (or it is the same leadership with a new
//! proclaimed value), and "no leader" only after a leader; repeats are
//! dropped.
//!
//! # Not done yet
//! - Missed intermediate leaders are not replayed (the server keeps no
//!   history of past leaders to replay from).

use std::sync::Arc;

use futures::Stream;
use latchkey_proto::v1::election_client::ElectionClient;
use latchkey_proto::v1::{LeaderResponse, ObserveRequest};

use crate::client::{CallSpec, Inner, BACKOFF_FIRST, BACKOFF_LONGEST};
use crate::error::{describe_status, Error};
use crate::retry::{classify, Backoff, Verdict};
use crate::types::{FencingToken, GrantInfo};

/// Streams that break one after another without delivering anything before
/// the observer gives up with [`Error::Unavailable`].
const MAX_BREAKS_WITHOUT_MESSAGE: usize = 20;

/// Filters the leaders received into the changes worth delivering.
#[derive(Debug, Default)]
pub(crate) struct ChangeFilter {
    /// The last leader delivered (`Some(None)` = "no leader" was delivered).
    last: Option<Option<GrantInfo>>,
    highest: Option<FencingToken>,
}

impl ChangeFilter {
    /// Whether `leader` is news, remembering it if so.
    pub(crate) fn admit(&mut self, leader: &Option<GrantInfo>) -> bool {
        let news = match (&self.last, leader) {
            (None, _) => true,
            (Some(last), next) if last == next => false,
            (Some(_), None) => matches!(self.last, Some(Some(_))),
            (Some(last), Some(next)) => {
                let higher = self.highest.is_none_or(|h| next.token > h);
                let reproclaimed = last.as_ref().is_some_and(|l| l.token == next.token);
                higher || reproclaimed
            }
        };
        if news {
            if let Some(next) = leader {
                self.highest = Some(self.highest.map_or(next.token, |h| h.max(next.token)));
            }
            self.last = Some(leader.clone());
        }
        news
    }
}

struct Observer {
    inner: Arc<Inner>,
    name: String,
    stream: Option<tonic::Streaming<LeaderResponse>>,
    filter: ChangeFilter,
    backoff: Backoff,
    breaks: usize,
    done: bool,
}

pub(crate) fn observe(
    inner: Arc<Inner>,
    name: String,
) -> impl Stream<Item = Result<Option<GrantInfo>, Error>> + Send + 'static {
    let observer = Observer {
        inner,
        name,
        stream: None,
        filter: ChangeFilter::default(),
        backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_LONGEST),
        breaks: 0,
        done: false,
    };
    futures::stream::unfold(observer, |mut observer| async move {
        let item = observer.next().await?;
        Some((item, observer))
    })
}

impl Observer {
    /// The next change, an error that ends the stream, or `None` after it.
    async fn next(&mut self) -> Option<Result<Option<GrantInfo>, Error>> {
        if self.done {
            return None;
        }
        // Bounded: each pass either delivers, skips a repeat the server sent
        // (the server sends only changes, so repeats are rare), or counts a
        // break against MAX_BREAKS_WITHOUT_MESSAGE.
        loop {
            if self.stream.is_none() {
                match self.open().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(error) => return self.fail(error),
                }
            }
            // Set just above.
            let stream = self.stream.as_mut().expect("stream is open");
            let status = match stream.message().await {
                Ok(Some(answer)) => {
                    self.breaks = 0;
                    self.backoff.reset(BACKOFF_FIRST);
                    let leader = answer.leader.map(GrantInfo::from);
                    if self.filter.admit(&leader) {
                        return Some(Ok(leader));
                    }
                    continue;
                }
                Ok(None) => tonic::Status::unavailable("observe stream ended"),
                Err(status) => status,
            };
            self.stream = None;
            self.breaks += 1;
            tracing::debug!(name = %self.name, "observe stream broke: {}", describe_status(&status));
            if classify(&status) == Verdict::Fail {
                return self.fail(Error::from_status(&status));
            }
            if self.breaks >= MAX_BREAKS_WITHOUT_MESSAGE {
                return self.fail(Error::Unavailable {
                    message: format!(
                        "observe stream broke {} times in a row; last: {}",
                        self.breaks,
                        describe_status(&status)
                    ),
                });
            }
            let pause = self.backoff.next_pause(&mut rand::thread_rng());
            tokio::time::sleep(pause).await;
        }
    }

    async fn open(&self) -> Result<tonic::Streaming<LeaderResponse>, Error> {
        let request = ObserveRequest {
            name: self.name.clone(),
        };
        self.inner
            .call(CallSpec::read(&self.inner.options), |channel| {
                let request = request.clone();
                async move { ElectionClient::new(channel).observe(request).await }
            })
            .await
    }

    fn fail(&mut self, error: Error) -> Option<Result<Option<GrantInfo>, Error>> {
        self.done = true;
        Some(Err(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{LeaseId, Revision};

    fn leader(token: u64, value: &str) -> Option<GrantInfo> {
        Some(GrantInfo {
            name: "e".into(),
            lease: LeaseId(1),
            token: FencingToken(token),
            value: value.into(),
            revision: Revision(0),
        })
    }

    #[test]
    fn first_answer_is_always_delivered_even_no_leader() {
        let mut filter = ChangeFilter::default();
        assert!(filter.admit(&None));
        assert!(!filter.admit(&None));
    }

    #[test]
    fn repeats_and_older_leaders_are_dropped_after_a_reconnection() {
        let mut filter = ChangeFilter::default();
        assert!(filter.admit(&leader(5, "a")));
        assert!(!filter.admit(&leader(5, "a")), "a repeat");
        assert!(filter.admit(&None));
        assert!(!filter.admit(&leader(5, "a")), "an older leadership");
        assert!(filter.admit(&leader(7, "b")));
    }

    #[test]
    fn a_new_proclaimed_value_of_the_same_leadership_is_delivered() {
        let mut filter = ChangeFilter::default();
        assert!(filter.admit(&leader(5, "a")));
        assert!(filter.admit(&leader(5, "b")));
    }
}
