//! What is particular to the smol runtime: one read spread over several host extents (its
//! buffer lent to one op, the others staged), and many tasks on a multi-threaded executor.

use qcow2_smol::{Cache, CreateOptions, OpenOptions};

#[test]
fn a_read_over_scattered_clusters_is_assembled() {
    for cache in [Cache::WriteBack, Cache::None] {
        smol::block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("d.qcow2");
            let o = OpenOptions {
                cache,
                ..OpenOptions::default()
            };
            let mut c = CreateOptions::new(16 << 20);
            c.cluster_size = 4096;
            let img = qcow2_smol::create(&path, &c, &o).await.unwrap();
            // Guest clusters written out of order get scattered host clusters: a read of
            // all of them is several ops of one request (plus a zero-filled gap).
            for cluster in [6u64, 0, 4, 2] {
                let (r, _) = img
                    .write_at(vec![cluster as u8 + 1; 4096], cluster * 4096)
                    .await;
                r.unwrap();
            }
            let (r, back) = img.read_at(vec![0xffu8; 7 * 4096], 0).await;
            r.unwrap();
            for (i, chunk) in back.chunks(4096).enumerate() {
                let want = if i % 2 == 0 { i as u8 + 1 } else { 0 };
                assert!(chunk.iter().all(|&b| b == want), "cluster {i} ({cache:?})");
            }
            img.close().await.unwrap();
        });
    }
}

#[test]
fn many_tasks_on_a_multi_threaded_executor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let ex = smol::Executor::new();
    let (stop, ready) = smol::channel::unbounded::<()>();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| smol::block_on(ex.run(ready.recv())));
        }
        smol::block_on(async {
            let img = qcow2_smol::create(
                &path,
                &CreateOptions::new(64 << 20),
                &OpenOptions::default(),
            )
            .await
            .unwrap();
            let tasks: Vec<_> = (0..64u64)
                .map(|i| {
                    let img = img.clone();
                    ex.spawn(async move {
                        let (r, _) = img.write_at(vec![i as u8; 8192], i << 20).await;
                        r.unwrap();
                        let (r, back) = img.read_at(vec![0u8; 8192], i << 20).await;
                        r.unwrap();
                        assert!(back.iter().all(|&b| b == i as u8));
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
            img.flush().await.unwrap();
            let report = img.check(None).await.unwrap();
            assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
            img.close().await.unwrap();
        });
        drop(stop);
    });
}

#[test]
fn more_requests_than_the_engine_takes_at_once() {
    // The engine takes 64 requests at a time; the rest wait in the driver's backlog.
    smol::block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        let img = qcow2_smol::create(
            &path,
            &CreateOptions::new(64 << 20),
            &OpenOptions::default(),
        )
        .await
        .unwrap();
        let writes: Vec<_> = (0..300u64)
            .map(|i| {
                let img = img.clone();
                smol::spawn(async move {
                    img.write_at(vec![(i % 251) as u8 + 1; 4096], i * 65536 + 512)
                        .await
                        .0
                })
            })
            .collect();
        for w in writes {
            w.await.unwrap();
        }
        for i in 0..300u64 {
            let (r, buf) = img.read_at(vec![0u8; 4096], i * 65536 + 512).await;
            r.unwrap();
            assert!(buf.iter().all(|&b| b == (i % 251) as u8 + 1), "request {i}");
        }
        img.close().await.unwrap();
    });
}
