//! Header extensions, stored in cluster 0 right after the fixed header.
//!
//! ```text
//! offset size field                     (docs/interop/qcow2.txt, "Header extensions")
//!      0    4 type                      0 = end of the list
//!      4    4 length                    of the data
//!      8    n data                      padded with zeroes to a multiple of 8
//! ```
//!
//! The list ends at type 0, at `backing_file_offset` when set, or at the end of cluster 0.
//! Unknown extensions are left where they are: the engine patches header fields in place and
//! never rewrites the extension area, so they survive every update.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::FormatError;

/// End of the extension list.
pub const END: u32 = 0;
/// Backing file format name.
pub const BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const FEATURE_NAMES: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const FDE: u32 = 0x0537_be77;
/// External data file name.
pub const DATA_FILE: u32 = 0x4441_5441;

/// The 8-byte head of every extension.
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawExtensionHeader {
    pub ext_type: U32,
    pub len: U32,
}

/// One entry of the feature name table (48 bytes).
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawFeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: [u8; 46],
}

/// The bitmaps extension payload (24 bytes).
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawBitmapsExt {
    pub nb_bitmaps: U32,
    pub reserved: U32,
    pub directory_size: U64,
    pub directory_offset: U64,
}

/// The FDE pointer payload (16 bytes).
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawFdeExt {
    pub offset: U64,
    pub length: U64,
}

const _: () = assert!(size_of::<RawFeatureName>() == 48);
const _: () = assert!(size_of::<RawBitmapsExt>() == 24);

/// Names of incompatible feature bits from the image's table, joined with ", " into a small
/// inline buffer (so errors stay `Copy` and small); names past its end are cut.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct FeatureNameSet {
    text: [u8; 62],
    len: u8,
    /// Bits whose names are in `text`.
    named: u64,
    /// (bit, start, length) of the first names in `text`.
    spans: [(u8, u8, u8); 4],
}

impl Default for FeatureNameSet {
    fn default() -> Self {
        Self {
            text: [0; 62],
            len: 0,
            named: 0,
            spans: [(u8::MAX, 0, 0); 4],
        }
    }
}

impl FeatureNameSet {
    fn push(&mut self, bit: u8, name: &[u8; 46]) {
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(46)];
        let sep: &[u8] = if self.len > 0 { b", " } else { b"" };
        let at = self.len as usize;
        let room = self.text.len() - at;
        let piece: Vec<u8> = sep.iter().chain(name).copied().take(room).collect();
        self.text[at..at + piece.len()].copy_from_slice(&piece);
        self.len += piece.len() as u8;
        self.named |= 1 << bit;
        if let Some(span) = self.spans.iter_mut().find(|s| s.0 == u8::MAX) {
            let start = (at + sep.len()).min(self.len as usize);
            *span = (bit, start as u8, (self.len as usize - start) as u8);
        }
    }

    /// The name of incompatible bit `bit`, if the image's table names it.
    pub fn name(&self, bit: u32) -> Option<&str> {
        let &(_, start, len) = self.spans.iter().find(|s| u32::from(s.0) == bit)?;
        std::str::from_utf8(&self.text[start as usize..(start + len) as usize]).ok()
    }

    /// Bits that have a name.
    pub fn named_bits(&self) -> u64 {
        self.named
    }

    /// The names, joined with ", ".
    pub fn text(&self) -> &str {
        let bytes = &self.text[..self.len as usize];
        match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

/// Byte range of an extension's data within cluster 0.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ExtRange {
    /// Start of the data.
    pub start: usize,
    /// Length of the data.
    pub len: usize,
}

/// The extensions found in cluster 0.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Extensions {
    pub backing_format: Option<ExtRange>,
    pub feature_names: Option<ExtRange>,
    pub data_file: Option<ExtRange>,
    pub bitmaps: Option<RawBitmapsExtValue>,
    /// Where the bitmaps extension's header sits.
    pub bitmaps_at: Option<usize>,
    pub fde: Option<(u64, u64)>,
    /// Where the end marker sits (new extensions could go here).
    pub end_offset: usize,
}

/// Cluster 0's bytes with the backing file changed to `name` (none: no backing file) in
/// `format` (the backing-format extension; none: left out): every other extension is kept
/// as it is, the backing-format one first (as QEMU orders them), then the end marker, then
/// the name. `header_len` is the header's length, `area` where the extension list must
/// end (the old name's offset, or the cluster's end). Returns the new bytes (header fields
/// not yet updated), the name's offset and its length; `None` when it does not fit.
pub fn with_backing(
    cluster0: &[u8],
    header_len: usize,
    area: usize,
    name: Option<&str>,
    format: Option<&str>,
) -> Result<Option<(Vec<u8>, u64, u32)>, FormatError> {
    let spec = Relayout {
        header_len,
        area,
        new_header_len: header_len,
        name: name.map(str::as_bytes),
        format: format.map(str::as_bytes),
        features: FeatureTable::Keep,
        drop_bitmaps: false,
    };
    relayout(cluster0, &spec)
}

/// What becomes of the feature-name table when cluster 0 is laid out again.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum FeatureTable {
    /// Kept where it is among the other extensions.
    Keep,
    /// Replaced by QEMU's table ([`default_feature_names`]), right after the backing
    /// format (a version 3 header, as QEMU writes it).
    Default,
    /// Left out (a version 2 header: QEMU writes no table there).
    Drop,
}

/// How [`relayout`] lays cluster 0 out.
#[derive(Clone, Copy, Debug)]
pub struct Relayout<'a> {
    /// The current header's length.
    pub header_len: usize,
    /// Where the current extension list must end (the backing name's offset, or the
    /// cluster's end).
    pub area: usize,
    /// The new header's length (72 for version 2, 112 for version 3).
    pub new_header_len: usize,
    /// The backing file name (none: no backing file).
    pub name: Option<&'a [u8]>,
    /// The backing format extension's contents (none: left out).
    pub format: Option<&'a [u8]>,
    /// The feature-name table.
    pub features: FeatureTable,
    /// Leave the bitmaps extension out.
    pub drop_bitmaps: bool,
}

/// Cluster 0 laid out again: a header of `new_header_len` bytes (the current header's
/// bytes as far as both reach, zeros after; the caller encodes the fields), the backing
/// format extension, the feature-name table as `features` says, every other extension in
/// its order, the end marker and the backing file name. Returns the bytes, the name's
/// offset (0 without a name) and length; `None` when they do not fit in `cluster0`'s
/// length.
pub fn relayout(
    cluster0: &[u8],
    spec: &Relayout<'_>,
) -> Result<Option<(Vec<u8>, u64, u32)>, FormatError> {
    let area = spec.area.min(cluster0.len());
    // Validates the list first (the walk below trusts it).
    Extensions::parse(cluster0, spec.header_len, area)?;
    let table: Vec<u8> = default_feature_names()
        .iter()
        .flat_map(|f| f.as_bytes().to_vec())
        .collect();
    let mut exts: Vec<(u32, &[u8])> = Vec::new();
    if let Some(f) = spec.format {
        exts.push((BACKING_FORMAT, f));
    }
    if spec.features == FeatureTable::Default {
        exts.push((FEATURE_NAMES, &table));
    }
    let mut off = spec.header_len;
    while off + 8 <= area {
        let head = RawExtensionHeader::read_from_bytes(&cluster0[off..off + 8]).expect("8 bytes");
        let (kind, len) = (head.ext_type.get(), head.len.get() as usize);
        if kind == END {
            break;
        }
        let dropped = kind == BACKING_FORMAT
            || kind == FEATURE_NAMES && spec.features != FeatureTable::Keep
            || kind == BITMAPS && spec.drop_bitmaps;
        if !dropped {
            exts.push((kind, &cluster0[off + 8..off + 8 + len]));
        }
        off += 8 + len.next_multiple_of(8);
    }
    let mut out = cluster0[..spec.header_len.min(spec.new_header_len)].to_vec();
    out.resize(spec.new_header_len, 0);
    for (kind, data) in exts {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0; 8]);
    let at = out.len() as u64;
    let n = spec.name.map_or(0, <[u8]>::len);
    if let Some(name) = spec.name {
        out.extend_from_slice(name);
    }
    if out.len() > cluster0.len() || n > crate::format::MAX_BACKING_NAME as usize {
        return Ok(None);
    }
    Ok(Some((
        out,
        if spec.name.is_some() { at } else { 0 },
        n as u32,
    )))
}

/// The bitmaps extension's 24 bytes of data.
pub fn bitmaps_payload(b: RawBitmapsExtValue) -> [u8; 24] {
    let raw = RawBitmapsExt {
        nb_bitmaps: b.nb_bitmaps.into(),
        reserved: 0.into(),
        directory_size: b.directory_size.into(),
        directory_offset: b.directory_offset.into(),
    };
    let mut out = [0; 24];
    out.copy_from_slice(raw.as_bytes());
    out
}

/// The bitmaps extension, decoded.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct RawBitmapsExtValue {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl Extensions {
    /// Walks the extension list of `cluster0` from `start` up to `end`.
    pub fn parse(cluster0: &[u8], start: usize, end: usize) -> Result<Self, FormatError> {
        let mut ext = Self::default();
        let mut off = start;
        let end = end.min(cluster0.len());
        // Like QEMU: every extension's head and data must fit before `end`, tested before its
        // type is looked at (an end marker with too large a length is refused too).
        while off < end {
            let mut head = [0u8; 8];
            let avail = (end - off).min(8);
            head[..avail].copy_from_slice(&cluster0[off..off + avail]);
            let head = RawExtensionHeader::read_from_bytes(&head).expect("8 bytes");
            let (ext_type, len) = (head.ext_type.get(), head.len.get() as usize);
            let data = off + 8;
            if data > end || len > end - data {
                return Err(FormatError::ExtensionTooLarge {
                    ext_type,
                    offset: off as u64,
                });
            }
            if ext_type == END {
                ext.end_offset = off;
                return Ok(ext);
            }
            let range = ExtRange { start: data, len };
            let bytes = &cluster0[data..data + len];
            let invalid = FormatError::InvalidExtension {
                ext_type,
                offset: off as u64,
            };
            match ext_type {
                BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(invalid);
                    }
                    ext.backing_format = Some(range);
                }
                FEATURE_NAMES => ext.feature_names = Some(range),
                DATA_FILE => ext.data_file = Some(range),
                BITMAPS => {
                    let Ok((raw, _)) = RawBitmapsExt::read_from_prefix(bytes) else {
                        return Err(invalid);
                    };
                    if len != 24 {
                        return Err(invalid);
                    }
                    ext.bitmaps_at = Some(off);
                    ext.bitmaps = Some(RawBitmapsExtValue {
                        nb_bitmaps: raw.nb_bitmaps.get(),
                        directory_size: raw.directory_size.get(),
                        directory_offset: raw.directory_offset.get(),
                    });
                }
                FDE => {
                    let Ok((raw, _)) = RawFdeExt::read_from_prefix(bytes) else {
                        return Err(invalid);
                    };
                    if len != 16 {
                        return Err(invalid);
                    }
                    ext.fde = Some((raw.offset.get(), raw.length.get()));
                }
                _ => {}
            }
            off = data + len.next_multiple_of(8);
        }
        ext.end_offset = off.min(end);
        Ok(ext)
    }

    /// The names of the incompatible bits in `bits`, from the feature name table.
    pub fn incompatible_names(&self, cluster0: &[u8], bits: u64) -> FeatureNameSet {
        let mut set = FeatureNameSet::default();
        let Some(r) = self.feature_names else {
            return set;
        };
        for chunk in cluster0[r.start..r.start + r.len].chunks_exact(48) {
            let Ok(entry) = RawFeatureName::read_from_bytes(chunk) else {
                continue;
            };
            if entry.kind == 0 && entry.bit < 64 && bits & (1 << entry.bit) != 0 {
                set.push(entry.bit, &entry.name);
            }
        }
        set
    }
}

/// The feature name table QEMU writes, for new images.
pub fn default_feature_names() -> Vec<RawFeatureName> {
    let entries: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    entries
        .iter()
        .map(|&(kind, bit, name)| {
            let mut n = [0u8; 46];
            n[..name.len()].copy_from_slice(name.as_bytes());
            RawFeatureName { kind, bit, name: n }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_bounds_like_qemu() {
        let mut c = vec![0u8; 512];
        assert!(Extensions::parse(&c, 112, 512).is_ok());
        // An end marker whose length runs past the area is refused.
        c[116..120].copy_from_slice(&1000u32.to_be_bytes());
        let too_large = FormatError::ExtensionTooLarge {
            ext_type: 0,
            offset: 112,
        };
        assert_eq!(Extensions::parse(&c, 112, 512), Err(too_large));
        // Fewer than 8 bytes left before the end of the area.
        let c = vec![0u8; 512];
        let too_large = FormatError::ExtensionTooLarge {
            ext_type: 0,
            offset: 508,
        };
        assert_eq!(Extensions::parse(&c, 508, 512), Err(too_large));
        assert!(Extensions::parse(&c, 512, 512).is_ok());
    }
}
