//! The runtime's side of external data files: policy, writability, locking.

use qcow2_proto::CreateOptions;
use qcow2_sync::{BackingPolicy, Error, Image, OpenOptions};

fn made(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("img.qcow2");
    let mut o = CreateOptions::new(1 << 20);
    o.data_file = Some("img.data".into());
    let mut image = Image::create(&img, &o, &OpenOptions::default()).unwrap();
    image.write_at(&[0x42; 4096], 8192).unwrap();
    image.close().unwrap();
    img
}

#[test]
fn refuse_policy_refuses_the_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = made(dir.path());
    let options = OpenOptions {
        backing: BackingPolicy::Refuse,
        ..OpenOptions::read_only()
    };
    match Image::open(&img, &options) {
        Err(Error::DataFileRefused { name }) => assert_eq!(name, "img.data"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("the data file was opened against the policy"),
    }
}

#[test]
fn data_file_is_locked_and_read_through() {
    let dir = tempfile::tempdir().unwrap();
    let img = made(dir.path());
    let writer = Image::open(&img, &OpenOptions::default()).unwrap();
    // The data file is locked with the image: a second writer is refused.
    assert!(Image::open(&img, &OpenOptions::default()).is_err());
    writer.close().unwrap();
    let mut reader = Image::open(&img, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 4096];
    reader.read_at(&mut buf, 8192).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    reader.close().unwrap();
    // Missing data file: the open fails, naming it.
    std::fs::remove_file(dir.path().join("img.data")).unwrap();
    match Image::open(&img, &OpenOptions::read_only()) {
        Err(Error::DataFile { name, .. }) => assert_eq!(name, "img.data"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("opened without its data file"),
    }
}
