//! Bounded metadata caches: L2 slices and refcount blocks.
//!
//! Invariants:
//! 1. At most `max_slots` slots exist; each holds one unit (`unit` bytes) keyed by its host
//!    offset. Slots and their buffers are created on first use and then reused forever.
//! 2. A slot is `Loading` while its buffer is out in a read op; nobody touches it then.
//! 3. A dirty slot is never evicted; write-back copies its contents into a spare buffer
//!    (so the slot stays usable while the copy is in flight) and marks it clean.
//! 4. Eviction picks the least recently used clean `Ready` (or failed) slot whose write-back
//!    copy is not in flight: reloading it before that write lands would read stale bytes.

use hashbrown::HashMap;

use crate::io::{IoBuf, IoError};

#[derive(Debug, Clone, Copy, Eq, PartialEq)]
pub(super) enum SlotState {
    Loading,
    Ready,
    Failed(IoError),
}

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) key: u64,
    pub(super) buf: Option<IoBuf>,
    pub(super) state: SlotState,
    pub(super) dirty: bool,
    /// A write-back copy of this slot is in flight.
    pub(super) writing: bool,
    last_use: u64,
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
pub(super) enum Lookup {
    Hit(u32),
    Loading,
    Failed(IoError),
    Miss,
}

#[derive(Debug)]
pub(super) struct Cache {
    pub(super) unit: usize,
    pub(super) slots: Vec<Slot>,
    map: HashMap<u64, u32>,
    max_slots: usize,
    tick: u64,
    spare: Vec<IoBuf>,
}

impl Cache {
    pub(super) fn new(unit: usize, max_slots: usize) -> Self {
        let max_slots = max_slots.max(2);
        Self {
            unit,
            slots: Vec::with_capacity(max_slots),
            map: HashMap::with_capacity(max_slots * 2),
            max_slots,
            tick: 0,
            spare: Vec::with_capacity(max_slots),
        }
    }

    /// Whether `key` has a slot (loaded, loading or failed).
    pub(super) fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    pub(super) fn lookup(&mut self, key: u64) -> Lookup {
        let Some(&i) = self.map.get(&key) else {
            return Lookup::Miss;
        };
        self.tick += 1;
        let slot = &mut self.slots[i as usize];
        slot.last_use = self.tick;
        match slot.state {
            SlotState::Loading => Lookup::Loading,
            SlotState::Ready => Lookup::Hit(i),
            SlotState::Failed(e) => Lookup::Failed(e),
        }
    }

    /// A slot for `key`, evicting if needed; `None` when every slot is dirty or busy.
    fn claim(&mut self, key: u64) -> Option<u32> {
        self.tick += 1;
        let i = if self.slots.len() < self.max_slots {
            self.slots.push(Slot {
                key,
                buf: None,
                state: SlotState::Ready,
                dirty: false,
                writing: false,
                last_use: 0,
            });
            (self.slots.len() - 1) as u32
        } else {
            let victim = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.dirty && !s.writing && s.state != SlotState::Loading)
                .min_by_key(|(_, s)| s.last_use)
                .map(|(i, _)| i as u32)?;
            let old = self.slots[victim as usize].key;
            self.map.remove(&old);
            victim
        };
        let slot = &mut self.slots[i as usize];
        slot.key = key;
        slot.dirty = false;
        slot.last_use = self.tick;
        if slot.buf.is_none() {
            slot.buf = Some(IoBuf::zeroed(self.unit));
        }
        self.map.insert(key, i);
        Some(i)
    }

    /// Starts loading `key`: the slot is `Loading` and its buffer is returned for the read.
    pub(super) fn start_load(&mut self, key: u64) -> Option<(u32, IoBuf)> {
        let i = self.claim(key)?;
        let slot = &mut self.slots[i as usize];
        slot.state = SlotState::Loading;
        Some((i, slot.buf.take().expect("claimed slots hold their buffer")))
    }

    pub(super) fn finish_load(&mut self, i: u32, buf: IoBuf, result: Result<(), IoError>) {
        let slot = &mut self.slots[i as usize];
        slot.buf = Some(buf);
        slot.state = match result {
            Ok(()) => SlotState::Ready,
            Err(e) => SlotState::Failed(e),
        };
    }

    /// A new, zero-filled, dirty unit for `key` (a table that does not exist on disk yet).
    pub(super) fn insert_zeroed(&mut self, key: u64) -> Option<u32> {
        let i = self.claim(key)?;
        let slot = &mut self.slots[i as usize];
        slot.state = SlotState::Ready;
        slot.dirty = true;
        slot.buf
            .as_mut()
            .expect("claimed slots hold their buffer")
            .as_mut_slice()
            .fill(0);
        Some(i)
    }

    /// A zero-filled, clean unit for `key` (a table just written as zeroes), if a slot is
    /// free without write-back.
    pub(super) fn insert_clean_zeroed(&mut self, key: u64) {
        if let Some(i) = self.insert_zeroed(key) {
            self.slots[i as usize].dirty = false;
        }
    }

    /// Drops `key` from the cache (its contents are stale); it must be clean.
    pub(super) fn forget(&mut self, key: u64) {
        if let Some(&i) = self.map.get(&key) {
            if self.slots[i as usize].state != SlotState::Loading {
                self.map.remove(&key);
                self.slots[i as usize].last_use = 0;
                self.slots[i as usize].dirty = false;
                self.slots[i as usize].key = u64::MAX;
            }
        }
    }

    pub(super) fn data(&self, i: u32) -> &[u8] {
        self.slots[i as usize]
            .buf
            .as_ref()
            .expect("ready slots hold their buffer")
            .as_slice()
    }

    pub(super) fn data_mut(&mut self, i: u32) -> &mut [u8] {
        let slot = &mut self.slots[i as usize];
        slot.dirty = true;
        slot.buf
            .as_mut()
            .expect("ready slots hold their buffer")
            .as_mut_slice()
    }

    /// The data of slot `i` for a change the disk holds already (the slot stays clean).
    pub(super) fn data_as_on_disk(&mut self, i: u32) -> &mut [u8] {
        self.slots[i as usize]
            .buf
            .as_mut()
            .expect("ready slots hold their buffer")
            .as_mut_slice()
    }

    /// Whether any slot is dirty.
    pub(super) fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }

    /// Copies dirty slot `i` into a spare buffer for write-back and marks it clean.
    pub(super) fn take_dirty_copy(&mut self, i: u32) -> (u64, IoBuf) {
        let mut copy = self.spare.pop().unwrap_or_else(|| IoBuf::zeroed(self.unit));
        copy.resize(self.unit);
        let slot = &mut self.slots[i as usize];
        slot.dirty = false;
        slot.writing = true;
        copy.as_mut_slice()
            .copy_from_slice(slot.buf.as_ref().expect("dirty slots are ready").as_slice());
        (slot.key, copy)
    }

    /// The write-back copy of slot `i` landed.
    pub(super) fn written(&mut self, i: u32) {
        if let Some(slot) = self.slots.get_mut(i as usize) {
            slot.writing = false;
        }
    }

    pub(super) fn return_spare(&mut self, buf: IoBuf) {
        if buf.capacity() >= self.unit && self.spare.len() < self.max_slots {
            self.spare.push(buf);
        }
    }

    /// Forgets everything (after a repair rewrote metadata behind the cache).
    /// Only called while no load is in flight.
    pub(super) fn clear(&mut self) {
        debug_assert!(self.slots.iter().all(|s| s.state != SlotState::Loading));
        self.map.clear();
        self.slots.clear();
    }
}
