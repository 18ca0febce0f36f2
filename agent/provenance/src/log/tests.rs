//! Tests of the provenance log: appends, sequence rules, quota, retention, reads, lineage.

use super::*;

#[test]
fn vm_names_are_checked() {
    for good in ["web", "w0", "db-1", "a.b_c", "X"] {
        assert!(check_vm_name(good).is_ok(), "{good}");
    }
    for bad in ["", ".", "..", "-x", "a/b", "a\0", &"x".repeat(65)] {
        assert!(check_vm_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn entries_must_be_consecutive() {
    let e = |seq| weft_dpa::Entry {
        seq,
        guest_time_us: 0,
        data_type: weft_dpa::DataType::Kv,
        op: weft_dpa::Operation::Insert,
        source: "/k".into(),
        collection: String::new(),
        key: "a".into(),
        old: None,
        new: Some("\"1\"".into()),
        tx: None,
    };
    assert!(check_entries(&[e(1), e(2)]).is_ok());
    assert!(check_entries(&[e(1), e(3)]).is_err());
    assert!(check_entries(&[e(0)]).is_err());
    let mut big = e(1);
    big.key = "k".repeat(2000);
    assert!(check_entries(&[big]).is_err());
}
