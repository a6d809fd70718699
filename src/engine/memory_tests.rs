//! Unit tests of the memory map (`memory.rs`).

use super::*;

#[test]
fn host_writes_are_recorded_by_page_only_while_tracked() {
    let record = WriteRecord::default();
    record.note_write(0, 8); // not tracked yet: nothing to record
    record.track(200);
    record.note_write(0xfff, 2); // straddles pages 0 and 1
    record.note_write(199 * PAGE_SIZE, 1);
    record.note_write(5 * PAGE_SIZE, 0);
    let mut bits = vec![0u64; 4];
    assert!(!record.take(&mut bits));
    assert_eq!(bits, vec![0b11, 0, 0, 1 << (199 - 192)]);
    let mut again = vec![0u64; 4];
    assert!(!record.take(&mut again));
    assert_eq!(again, vec![0; 4], "taking empties the record");
}

#[test]
fn a_view_makes_the_region_wholly_written_until_released_and_taken() {
    let record = WriteRecord::default();
    record.track(64);
    record.view_exported();
    let mut bits = vec![0u64; 1];
    assert!(record.take(&mut bits), "written through a view");
    assert!(record.take(&mut bits), "still exported");
    record.view_released();
    assert!(record.take(&mut bits), "exported until just now");
    assert!(!record.take(&mut bits), "no view since the last restore");
    record.view_exported();
    record.view_released();
    assert!(
        record.take(&mut bits),
        "exported and released since the last restore"
    );
    record.add_pages(&[1 << 9]);
    let mut bits = vec![0u64; 1];
    record.take(&mut bits);
    assert_eq!(bits, vec![1 << 9]);
}
