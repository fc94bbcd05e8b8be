//! Crash semantics of the in-memory backend, through the [`Engine`] API.

use super::super::{Batch, Engine, CF_RAFT_LOG, CF_STATE};
use super::{MemoryDisk, PowerLoss, RECORD_HEADER};

fn put(engine: &Engine, key: &str, value: &str, sync: bool) {
    let mut batch = Batch::new(engine);
    batch.put(CF_STATE, key.as_bytes(), value.as_bytes());
    engine.write(batch, sync).expect("write to an open engine");
}

fn get(engine: &Engine, key: &str) -> Option<String> {
    engine
        .get(CF_STATE, key.as_bytes())
        .expect("read from an open engine")
        .map(|value| String::from_utf8(value).expect("utf-8 test value"))
}

fn cut_everything() -> PowerLoss {
    PowerLoss {
        kept_bytes: 0,
        torn_fill: None,
    }
}

#[test]
fn process_exit_keeps_unsynced_writes() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).unwrap();
    put(&engine, "k/a", "1", false);
    drop(engine);
    let engine = Engine::open_memory(&disk).unwrap();
    assert_eq!(get(&engine, "k/a").as_deref(), Some("1"));
}

#[test]
fn power_loss_drops_writes_since_the_last_sync_and_keeps_synced_ones() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).unwrap();
    put(&engine, "k/before", "1", false);
    put(&engine, "k/synced", "2", true);
    put(&engine, "k/after", "3", false);
    assert!(disk.unsynced_bytes() > 0);
    disk.lose_power(cut_everything());
    assert!(
        engine.get(CF_STATE, b"k/synced").is_err(),
        "an engine stops working when the power fails"
    );
    drop(engine);
    let engine = Engine::open_memory(&disk).unwrap();
    assert_eq!(
        get(&engine, "k/before").as_deref(),
        Some("1"),
        "a sync makes earlier writes durable too"
    );
    assert_eq!(get(&engine, "k/synced").as_deref(), Some("2"));
    assert_eq!(get(&engine, "k/after"), None, "the unsynced write is lost");
}

#[test]
fn power_loss_keeps_a_prefix_of_the_unsynced_writes() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).unwrap();
    put(&engine, "k/first", "1", false);
    let first_record = disk.unsynced_bytes();
    put(&engine, "k/second", "2", false);
    put(&engine, "k/third", "3", false);
    // The cut falls inside the second record's payload.
    disk.lose_power(PowerLoss {
        kept_bytes: first_record + RECORD_HEADER + 3,
        torn_fill: None,
    });
    drop(engine);
    let engine = Engine::open_memory(&disk).unwrap();
    assert_eq!(get(&engine, "k/first").as_deref(), Some("1"));
    assert_eq!(get(&engine, "k/second"), None, "the cut record is dropped");
    assert_eq!(get(&engine, "k/third"), None);
    assert_eq!(disk.torn_records_dropped(), 1);
}

#[test]
fn torn_last_write_is_caught_by_its_checksum_and_dropped() {
    for fill in [0x00, 0xff, 0x5a] {
        for offset in [0, 2, 5, 9, 14] {
            let disk = MemoryDisk::new();
            let engine = Engine::open_memory(&disk).unwrap();
            put(&engine, "k/durable", "d", true);
            put(&engine, "k/kept", "1", false);
            let kept = disk.unsynced_bytes();
            put(
                &engine,
                "k/torn",
                "a longer value, torn by the power loss",
                false,
            );
            disk.lose_power(PowerLoss {
                kept_bytes: kept + offset,
                torn_fill: Some(fill),
            });
            drop(engine);
            let engine = Engine::open_memory(&disk)
                .unwrap_or_else(|e| panic!("fill {fill:#x} at +{offset}: a torn tail opens: {e}"));
            assert_eq!(get(&engine, "k/durable").as_deref(), Some("d"));
            assert_eq!(get(&engine, "k/kept").as_deref(), Some("1"));
            assert_eq!(get(&engine, "k/torn"), None, "fill {fill:#x} at +{offset}");
            // A cut on a record boundary leaves nothing torn behind.
            assert_eq!(disk.torn_records_dropped(), u64::from(offset > 0));
            // The node carries on: new writes land after the dropped tail
            // and survive the next crash.
            put(&engine, "k/later", "2", false);
            drop(engine);
            let engine = Engine::open_memory(&disk).unwrap();
            assert_eq!(get(&engine, "k/later").as_deref(), Some("2"));
            assert_eq!(get(&engine, "k/kept").as_deref(), Some("1"));
        }
    }
}

#[test]
fn a_batch_survives_whole_or_not_at_all() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).unwrap();
    let mut batch = Batch::new(&engine);
    batch.put(CF_STATE, b"k/x", b"1");
    batch.put(CF_RAFT_LOG, &7u64.to_be_bytes(), b"entry");
    engine.write(batch, false).unwrap();
    drop(engine);
    let whole = disk.unsynced_bytes();
    for kept in 0..whole {
        let copy = disk.clone_for_test();
        copy.lose_power(PowerLoss {
            kept_bytes: kept,
            torn_fill: Some(0xab),
        });
        let reopened = Engine::open_memory(&copy).unwrap();
        assert_eq!(get(&reopened, "k/x"), None, "cut at {kept}");
        assert_eq!(
            reopened.get(CF_RAFT_LOG, &7u64.to_be_bytes()).unwrap(),
            None
        );
    }
}

#[test]
fn flush_makes_every_write_durable() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).unwrap();
    put(&engine, "k/a", "1", false);
    engine.flush().unwrap();
    assert_eq!(disk.unsynced_bytes(), 0);
    disk.lose_power(cut_everything());
    drop(engine);
    let engine = Engine::open_memory(&disk).unwrap();
    assert_eq!(get(&engine, "k/a").as_deref(), Some("1"));
}

#[test]
fn a_disk_opens_once_at_a_time() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).unwrap();
    assert!(Engine::open_memory(&disk).is_err());
    let clone = engine.clone();
    drop(engine);
    assert!(
        Engine::open_memory(&disk).is_err(),
        "a clone keeps the engine open"
    );
    drop(clone);
    assert!(Engine::open_memory(&disk).is_ok());
}

#[test]
fn deletes_and_range_deletes_replay_after_a_crash() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).unwrap();
    let mut batch = Batch::new(&engine);
    for index in 1..=600u64 {
        batch.put(CF_RAFT_LOG, &index.to_be_bytes(), b"entry");
    }
    engine.write(batch, true).unwrap();
    let mut batch = Batch::new(&engine);
    batch.delete_range(CF_RAFT_LOG, &1u64.to_be_bytes(), &301u64.to_be_bytes());
    batch.delete(CF_RAFT_LOG, &600u64.to_be_bytes());
    engine.write(batch, false).unwrap();
    drop(engine);
    let engine = Engine::open_memory(&disk).unwrap();
    let mut seen = Vec::new();
    engine
        .scan_from(CF_RAFT_LOG, &[], |key, _| {
            seen.push(u64::from_be_bytes(key.try_into().unwrap()));
            true
        })
        .unwrap();
    // Scans cross several chunks of the memory backend.
    assert_eq!(seen, (301..600).collect::<Vec<_>>());
}

#[test]
fn checksum_mismatch_stops_open_naming_family_and_key() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).unwrap();
    let mut raw = super::super::frame(b"k/good", b"value");
    raw[5] ^= 0x01;
    engine.put_raw_for_test(CF_STATE, b"k/bad", &raw);
    drop(engine);
    let err = Engine::open_memory(&disk)
        .err()
        .expect("open must fail")
        .to_string();
    assert!(err.contains("\"state\""), "names the column family: {err}");
    assert!(err.contains("k/bad"), "names the key: {err}");
}
