use super::*;
use crate::storage::Batch;

/// An engine with an applied position, a membership and `count` records.
fn engine_with_records(dir: &Path, count: u64) -> Engine {
    let engine = Engine::open(dir).expect("open engine");
    let mut batch = Batch::new(&engine);
    batch.put_message(CF_STATE, keys::APPLIED, &LogPosition { index: 42, term: 7 });
    let mut conf_state = ConfState::default();
    conf_state.set_voters(vec![1, 2, 3]);
    batch.put(
        CF_STATE,
        keys::CONF_STATE,
        &conf_state.write_to_bytes().unwrap(),
    );
    for i in 0..count {
        batch.put(
            CF_STATE,
            &keys::kv(format!("key-{i:05}").as_bytes()),
            &[i as u8; 100],
        );
    }
    engine.write(batch, true).expect("write");
    engine
}

/// A record of a snapshot file: key and framed value.
type Record = (Vec<u8>, Vec<u8>);

fn records_of(path: &Path) -> Result<Vec<Record>, SnapshotFileError> {
    let mut records = Vec::new();
    read(path, |key, raw| {
        records.push((key.to_vec(), raw.to_vec()));
        Ok(())
    })?;
    Ok(records)
}

#[test]
fn a_written_snapshot_reads_back_with_its_position_membership_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with_records(&dir.path().join("db"), 500);
    let path = dir.path().join("s.snap");
    let written = write_from_engine(&engine, &path).expect("write");
    assert_eq!((written.index, written.term), (42, 7));
    assert_eq!(written.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(written.records, 502);
    assert!(!part_path(&path).exists(), "renamed into place");
    let verified = verify(&path).expect("verifies");
    assert_eq!(verified, written);
    assert_eq!(verified.bytes, std::fs::metadata(&path).unwrap().len());
    let records = records_of(&path).expect("reads");
    assert_eq!(records, engine.state_records().unwrap());
}

#[test]
fn a_truncated_or_damaged_file_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with_records(&dir.path().join("db"), 50);
    let path = dir.path().join("s.snap");
    write_from_engine(&engine, &path).expect("write");
    let good = std::fs::read(&path).unwrap();
    let copy = dir.path().join("copy.snap");
    for cut in [0, 5, 8, 100, good.len() / 2, good.len() - 5, good.len() - 1] {
        std::fs::write(&copy, &good[..cut]).unwrap();
        let error = verify(&copy).expect_err("truncated");
        let text = error.to_string();
        assert!(
            matches!(
                error,
                SnapshotFileError::Truncated { .. } | SnapshotFileError::NotASnapshot { .. }
            ),
            "cut at {cut}: {text}"
        );
        assert_eq!(text.lines().count(), 1, "{text}");
    }
    for flip in [20, good.len() / 2, good.len() - 10] {
        let mut bad = good.clone();
        bad[flip] ^= 0x40;
        std::fs::write(&copy, &bad).unwrap();
        let error = verify(&copy).expect_err("damaged");
        assert!(
            matches!(
                error,
                SnapshotFileError::Checksum { .. }
                    | SnapshotFileError::Malformed { .. }
                    | SnapshotFileError::Truncated { .. }
            ),
            "flip at {flip}: {error}"
        );
    }
    std::fs::write(&copy, b"hello, not a snapshot").unwrap();
    assert!(matches!(
        verify(&copy),
        Err(SnapshotFileError::NotASnapshot { .. })
    ));
    let mut longer = good.clone();
    longer.push(0);
    std::fs::write(&copy, &longer).unwrap();
    assert!(verify(&copy).is_err(), "trailing bytes");
}
