//! qemu's heuristic for "this qcow2 image was created with `preallocation=metadata`".
//!
//! qemu asks the host file where its holes are inside data clusters only for such images
//! (`qcow2_detect_metadata_preallocation`): when at least `max(real * 10 / 9, real + 2)`
//! host clusters have a non-zero refcount, where `real` is the number of clusters the file
//! actually occupies on disk. `map` must apply the same test to report what qemu reports
//! (`"zero": true, "data": true` for preallocated, never written clusters).

use qcow2_sync::Image;

use crate::host::allocated_bytes;

/// Whether the qcow2 image `img` looks metadata-preallocated to qemu.
pub fn detect_metadata_preallocation(img: &mut Image) -> std::io::Result<bool> {
    let cs = img.info().cluster_size;
    let file = img.file().try_clone()?;
    let real_clusters = allocated_bytes(&file)? / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let file_len = file.metadata()?.len();
    let count = img
        .count_used_clusters(file_len, threshold)
        .map_err(std::io::Error::other)?;
    Ok(count >= threshold)
}
