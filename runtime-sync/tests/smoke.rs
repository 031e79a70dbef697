//! Quick end-to-end checks of the blocking runtime against qemu-img.

use std::process::Command;

use qcow2_sync::{CreateOptions, Image, OpenOptions};

fn qemu_img_check(path: &std::path::Path) -> serde_json_lite::Value {
    let out = Command::new("qemu-img").args(["check", "--output=json"]).arg(path).output().expect("qemu-img runs");
    serde_json_lite::parse(&String::from_utf8_lossy(&out.stdout))
}

mod serde_json_lite {
    /// Just enough JSON to read qemu-img check's flat object of integers and strings.
    pub type Value = std::collections::BTreeMap<String, String>;
    pub fn parse(s: &str) -> Value {
        let mut v = Value::new();
        for line in s.lines() {
            let line = line.trim().trim_end_matches(',');
            if let Some((k, val)) = line.split_once(':') {
                v.insert(k.trim().trim_matches('"').to_owned(), val.trim().trim_matches('"').to_owned());
            }
        }
        v
    }
}

#[test]
fn write_read_reopen_and_qemu_check_clean() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let mut img = Image::create(&path, &CreateOptions::new(64 << 20), &OpenOptions::default()).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    img.write_at(&data, 12345).unwrap();
    img.write_at(&data[..100], 40 << 20).unwrap();
    img.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    drop(img);
    let report = qemu_img_check(&path);
    assert_eq!(report.get("check-errors").map(String::as_str), Some("0"), "{report:?}");
    assert!(!report.contains_key("corruptions") && !report.contains_key("leaks"), "{report:?}");
    let mut img = Image::open(&path, &OpenOptions::default()).unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    let out = Command::new("qemu-io").args(["-r", "-c", "read -P 0 0 12345"]).arg(&path).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("fail"), "{}", String::from_utf8_lossy(&out.stdout));
}
