use super::*;

fn table(ids: &[u64]) -> MemberTable {
    ids.iter()
        .map(|id| {
            let info = MemberInfo {
                peer_addr: format!("127.0.0.1:{}", 7000 + id),
                client_addr: String::new(),
            };
            (NodeId(*id), info)
        })
        .collect()
}

/// Voters 1..=5 (1 leads) and learner 6; `down` do not answer; 6 is at `learner_matched`.
fn progress(down: &[u64], learner_matched: u64) -> ProgressReport {
    let mut members: Vec<MemberProgress> = (1..=5)
        .map(|id| MemberProgress {
            id: NodeId(id),
            voter: true,
            matched: 1000,
            active: !down.contains(&id),
        })
        .collect();
    members.push(MemberProgress {
        id: NodeId(6),
        voter: false,
        matched: learner_matched,
        active: !down.contains(&6),
    });
    ProgressReport {
        leader: NodeId(1),
        last_index: 1000,
        members,
    }
}

#[test]
fn adding_an_id_or_an_address_in_use_is_refused() {
    let members = table(&[1, 2, 3]);
    let add = |id: u64, peer: &str| Change::AddLearner {
        id: NodeId(id),
        peer_addr: peer.into(),
        client_addr: "127.0.0.1:9000".into(),
    };
    let report = progress(&[], 1000);
    let taken = check(&add(2, "10.0.0.9:7002"), &members, &report).unwrap_err();
    assert!(taken.to_string().contains("already in use"), "{taken}");
    let same_addr = check(&add(9, "127.0.0.1:7002"), &members, &report).unwrap_err();
    assert!(
        same_addr.to_string().contains("already member 2"),
        "{same_addr}"
    );
    let bad = check(&add(9, "nowhere"), &members, &report).unwrap_err();
    assert!(matches!(
        bad,
        Refusal::Invalid {
            field: "peer_addr",
            ..
        }
    ));
    assert!(check(&add(0, "10.0.0.9:1"), &members, &report).is_err());
    assert_eq!(check(&add(9, "10.0.0.9:7002"), &members, &report), Ok(()));
}

#[test]
fn a_learner_that_has_not_caught_up_is_not_promoted() {
    let members = table(&[1, 2, 3, 4, 5, 6]);
    let promote = Change::Promote { id: NodeId(6) };
    let behind = check(&promote, &members, &progress(&[], 10)).unwrap_err();
    assert!(behind.to_string().contains("has not caught up"), "{behind}");
    let silent = check(&promote, &members, &progress(&[6], 1000));
    assert!(silent.is_err(), "a learner that does not answer");
    assert_eq!(check(&promote, &members, &progress(&[], 950)), Ok(()));
    let voter = check(
        &Change::Promote { id: NodeId(2) },
        &members,
        &progress(&[], 1000),
    );
    assert!(voter.unwrap_err().to_string().contains("already a voter"));
}

#[test]
fn a_change_that_leaves_no_answering_quorum_is_refused() {
    let members = table(&[1, 2, 3, 4, 5, 6]);
    // 2 and 3 are down: removing 4 leaves 1, 2, 3, 5: quorum 3, answering 2.
    let remove = Change::Remove { id: NodeId(4) };
    let refused = check(&remove, &members, &progress(&[2, 3], 1000)).unwrap_err();
    assert!(matches!(refused, Refusal::NoQuorum(_)), "{refused}");
    assert!(refused.to_string().contains("2 answer now"), "{refused}");
    // Removing a voter that is down leaves 4 voters, 3 answering: fine.
    assert_eq!(
        check(
            &Change::Remove { id: NodeId(2) },
            &members,
            &progress(&[2], 1000)
        ),
        Ok(())
    );
    // Promoting 6 with 3 voters down: 6 voters, quorum 4, answering 3.
    let promote = check(
        &Change::Promote { id: NodeId(6) },
        &members,
        &progress(&[2, 3, 4], 1000),
    );
    assert!(matches!(promote, Err(Refusal::NoQuorum(_))));
    assert!(check(
        &Change::Remove { id: NodeId(9) },
        &members,
        &progress(&[], 1000)
    )
    .is_err());
}

#[test]
fn tables_and_records_survive_their_encoding() {
    let members = table(&[1, 2, 7]);
    assert_eq!(decode(&encode(&members)), Ok(members.clone()));
    let info = members[&NodeId(7)].clone();
    assert_eq!(
        decode_record(&encode_record(NodeId(7), &info)),
        Ok((NodeId(7), info))
    );
    assert!(decode(b"\xff\xff").is_err());
}
