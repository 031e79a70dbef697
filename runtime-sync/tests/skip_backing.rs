//! An image opened without its backing file (`BackingPolicy::Skip`): writes that would
//! copy from the backing file fail with `Unsupported(BackingFile)` and leave nothing behind
//! (no leaked cluster); writes that need no copy work.

use qcow2_proto::{CreateOptions, Feature, RequestError};
use qcow2_sync::{BackingPolicy, Error, Image, OpenOptions};

#[test]
fn writes_needing_the_backing_file_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![0x5au8; 1 << 20]).unwrap();
    let path = dir.path().join("top.qcow2");
    for extended in [false, true] {
        let mut o = CreateOptions::new(1 << 20);
        o.backing_file = Some("base.raw".into());
        o.backing_format = Some("raw".into());
        o.extended_l2 = extended;
        Image::create(&path, &o, &OpenOptions::default())
            .unwrap()
            .close()
            .unwrap();
        let skip = OpenOptions {
            backing: BackingPolicy::Skip,
            ..OpenOptions::default()
        };
        let mut img = Image::open(&path, &skip).unwrap();
        // A partial cluster (head and tail to copy), and one whose tail alone needs copying.
        for (offset, len) in [(1000u64, 100usize), (0, 65536 + 512)] {
            match img.write_at(&vec![1; len], offset) {
                Err(Error::Request(RequestError::Unsupported(Feature::BackingFile))) => {}
                other => panic!("extended {extended}: write at {offset}: {other:?}"),
            }
        }
        // A whole cluster needs no copy.
        img.write_at(&[2; 65536], 131072).unwrap();
        let report = img.check(None).unwrap();
        assert_eq!(
            (report.corruptions, report.leaks),
            (0, 0),
            "extended {extended}: {report:?}"
        );
        img.close().unwrap();
    }
}
