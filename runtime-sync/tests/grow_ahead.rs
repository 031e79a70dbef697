//! Host space allocated ahead of new clusters (`OpenOptions::grow_step`): taken in steps
//! while the image is open, never more than the guest disk's size, and cut back at close.

use qcow2_proto::CreateOptions;
use qcow2_sync::{Image, OpenOptions, DEFAULT_GROW_STEP};

const MIB: u64 = 1 << 20;

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Opens a fresh image of `size` bytes, writes a cluster, and returns the file's length
/// while open and after close (the write reads back after reopening).
fn one_write(size: u64, options: &OpenOptions) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    Image::create(&path, &CreateOptions::new(size), options)
        .unwrap()
        .close()
        .unwrap();
    let mut img = Image::open(&path, options).unwrap();
    img.write_at(&[7; 65536], 0).unwrap();
    img.flush().unwrap();
    let open = file_len(&path);
    img.close().unwrap();
    let closed = file_len(&path);
    let mut img = Image::open(&path, options).unwrap();
    let mut got = vec![0; 65536];
    img.read_at(&mut got, 0).unwrap();
    assert!(got.iter().all(|&b| b == 7), "size {size}: data lost");
    let report = img.check(None).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    img.close().unwrap();
    (open, closed)
}

#[test]
fn a_large_image_grows_a_whole_step_ahead_and_gives_it_back() {
    let (open, closed) = one_write(4 << 30, &OpenOptions::default());
    assert!(open >= DEFAULT_GROW_STEP, "only {open} bytes while open");
    assert!(closed < MIB, "{closed} bytes left after close");
}

#[test]
fn a_small_image_grows_no_further_ahead_than_its_size() {
    let (open, closed) = one_write(4 * MIB, &OpenOptions::default());
    // The step is cut to the disk's 4 MiB; beyond it only the metadata before it.
    assert!(open <= 6 * MIB, "{open} bytes ahead for a 4 MiB disk");
    assert!(closed < MIB, "{closed} bytes left after close");
}

#[test]
fn no_step_no_space_ahead() {
    let off = OpenOptions {
        grow_step: Some(0),
        ..OpenOptions::default()
    };
    let (open, closed) = one_write(4 << 30, &off);
    assert!(open < MIB && closed < MIB, "{open} / {closed} bytes");
}
