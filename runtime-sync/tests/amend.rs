//! `Image::amend` through the blocking runtime: every refcount width and compat down and
//! up on one open image, contents and snapshot kept, `info` following, the image clean
//! after each; a refcount that does not fit refuses with its typed error and changes
//! nothing.

use qcow2_proto::{AmendError, AmendOptions, CreateOptions, RequestError};
use qcow2_sync::{Error, Image, OpenOptions, SnapshotRef};

fn read_all(img: &mut Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.len() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn clean(img: &mut Image, what: &str) {
    let r = img.check(None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{what}: {r:?}"
    );
}

#[test]
fn amend_keeps_contents_and_follows_in_info() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let mut o = CreateOptions::new(4 << 20);
    o.cluster_size = 4096;
    let mut img = Image::create(&path, &o, &OpenOptions::default()).unwrap();
    img.write_at(&[7; 100_000], 3000).unwrap();
    img.write_zeroes(1 << 20, 64 << 10, false).unwrap();
    img.snapshot_create("s").unwrap();
    img.write_at(&[9; 5000], 0).unwrap();
    let want = read_all(&mut img);
    // Shared clusters have refcount 2: one bit cannot hold it.
    let one = AmendOptions {
        refcount_bits: Some(1),
        ..AmendOptions::default()
    };
    match img.amend(one) {
        Err(Error::Request(RequestError::Amend(AmendError::RefcountTooWide {
            bits: 1,
            refcount: 2,
            ..
        }))) => {}
        other => panic!("refcount_bits=1: {other:?}"),
    }
    assert_eq!(img.info().refcount_bits, 16);
    let steps = [
        (None, Some(2), None),
        (None, Some(64), Some(true)),
        (Some(2), Some(16), None),
        (Some(3), Some(8), Some(true)),
        (None, Some(32), Some(false)),
    ];
    for (version, bits, lazy) in steps {
        let opts = AmendOptions {
            version,
            refcount_bits: bits,
            lazy_refcounts: lazy,
        };
        img.amend(opts).unwrap();
        let info = img.info();
        let what = format!("{opts:?}");
        if let Some(v) = version {
            assert_eq!(info.version, v, "{what}");
        }
        assert_eq!(info.refcount_bits, bits.unwrap(), "{what}");
        assert_eq!(info.lazy_refcounts, lazy.unwrap_or(false), "{what}");
        assert_eq!(read_all(&mut img), want, "{what}");
        clean(&mut img, &what);
        // Still writable: an allocating write, then clean again.
        img.write_at(&[3; 4096], 2 << 20).unwrap();
        img.write_at(&want[2 << 20..(2 << 20) + 4096], 2 << 20)
            .unwrap();
        clean(&mut img, &what);
    }
    img.close().unwrap();
    let snap = Image::open_snapshot(
        &path,
        &SnapshotRef::Name("s".into()),
        &OpenOptions::default(),
    );
    let mut snap = snap.unwrap();
    let got = read_all(&mut snap);
    assert_eq!(got[..3000], vec![0; 3000][..]);
    assert_eq!(got[3000..103_000], vec![7; 100_000][..]);
}
