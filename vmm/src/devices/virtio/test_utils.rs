//! A minimal split-virtqueue driver for tests: places descriptor chains in guest memory and
//! reads the used ring back, exactly as a guest driver would.

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

pub struct TestDriver<'a> {
    mem: &'a GuestMemoryMmap,
    layout: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    size: u16,
    /// The used ring, after the whole available ring (the mock's own layout puts it inside
    /// the available ring, which queues of more than a few entries overrun).
    used: u64,
}

/// One buffer of a chain: guest address, length, device-writable.
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl<'a> TestDriver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, GuestAddress(0), size)
    }

    /// A queue whose rings start at `base`.
    pub fn at(mem: &'a GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        let layout = MockSplitQueue::create(mem, base, size);
        let avail_end = layout.avail_addr().0 + 6 + 2 * u64::from(size);
        Self {
            mem,
            used: avail_end.next_multiple_of(4),
            layout,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            size,
        }
    }

    /// The device side of this queue.
    pub fn queue(&self) -> Queue {
        let mut queue: Queue = self.layout.create_queue().expect("valid test queue");
        virtio_queue::QueueT::set_used_ring_address(
            &mut queue,
            Some(self.used as u32),
            Some((self.used >> 32) as u32),
        );
        queue
    }

    /// Guest addresses of the descriptor table, available ring and used ring.
    pub fn ring_addresses(&self) -> [u64; 3] {
        [
            self.layout.desc_table_addr().0,
            self.layout.avail_addr().0,
            self.used,
        ]
    }

    fn write_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Publishes a chain and returns its head index.
    pub fn push_chain(&mut self, buffers: &[Buffer]) -> u16 {
        let head = self.next_desc;
        for (i, b) in buffers.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            let at = self.layout.desc_table_addr().0 + u64::from(index) * 16;
            self.write_desc(at, b.addr, b.len, flags, self.next_desc);
        }
        self.publish(head)
    }

    /// Publishes a chain of one ring descriptor pointing to an indirect table at `table`
    /// that holds `buffers`; returns its head index.
    pub fn push_indirect_chain(&mut self, table: u64, buffers: &[Buffer]) -> u16 {
        for (i, b) in buffers.iter().enumerate() {
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            let next = u16::try_from(i + 1).unwrap_or(0);
            self.write_desc(table + 16 * i as u64, b.addr, b.len, flags, next);
        }
        let head = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        let at = self.layout.desc_table_addr().0 + u64::from(head) * 16;
        let len = u32::try_from(16 * buffers.len()).unwrap();
        self.write_desc(at, table, len, DESC_F_INDIRECT, 0);
        self.publish(head)
    }

    /// Puts `head` in the available ring and moves the ring's index on.
    fn publish(&mut self, head: u16) -> u16 {
        let avail = self.layout.avail_addr().0;
        let slot = avail + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(avail + 2))
            .unwrap();
        head
    }

    /// Event index (VIRTIO_RING_F_EVENT_IDX): the driver wants an interrupt once the device
    /// has used the entry of this used-ring index (`used_event` after the available ring).
    pub fn set_used_event(&self, index: u16) {
        let at = self.layout.avail_addr().0 + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(index, GuestAddress(at)).unwrap();
    }

    /// Event index: the available-ring index past which the device wants a notification
    /// (`avail_event` after the used ring).
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY is 1).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used)).unwrap()
    }

    /// The next used element (head, length written), if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let used = self.used;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let at = used + 4 + u64::from(self.used_seen % self.size) * 8;
        self.used_seen = self.used_seen.wrapping_add(1);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        Some((id, len))
    }
}
