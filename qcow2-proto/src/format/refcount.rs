//! Refcount blocks at every width: 1, 2, 4, 8, 16, 32 or 64 bits per entry.
//!
//! ```text
//! refcount table entry (64-bit)          (docs/interop/qcow2.txt, "Host cluster management")
//!   bits  0.. 8  reserved (0)
//!   bits  9..63  refcount block offset (cluster aligned); 0 = none
//!
//! refcount block: cluster_size * 8 / refcount_bits entries
//!   widths >= 8: big-endian integers
//!   widths 1, 2, 4: packed, entry i at bit (i % (8 / bits)) * bits of byte i / (8 / bits),
//!                   least significant bits first
//! ```

/// Offset bits of a refcount table entry.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry.
pub const REFTABLE_RESERVED: u64 = 0x1ff;

/// Reads entry `index` of a refcount block of width `1 << order` bits.
pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            u64::from((block[index / per_byte] >> shift) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes([block[2 * index], block[2 * index + 1]])),
        5 => {
            let b = &block[4 * index..4 * index + 4];
            u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&block[8 * index..8 * index + 8]);
            u64::from_be_bytes(b)
        }
    }
}

/// Writes entry `index` of a refcount block of width `1 << order` bits. `value` must fit.
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) {
    debug_assert!(value <= max(order));
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut block[index / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[index] = value as u8,
        4 => block[2 * index..2 * index + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * index..4 * index + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * index..8 * index + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// The largest refcount at width `1 << order`.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            for i in 0..entries {
                set(&mut block, order, i, (i as u64 * 7 + 3) & max(order));
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7 + 3) & max(order),
                    "order {order} entry {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_widths_pack_lsb_first() {
        let mut block = [0u8; 1];
        set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 0b0000_0001);
        set(&mut block, 0, 7, 1);
        assert_eq!(block[0], 0b1000_0001);
        let mut block = [0u8; 1];
        set(&mut block, 2, 1, 0xa);
        assert_eq!(block[0], 0xa0);
    }
}
