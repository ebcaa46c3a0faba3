//! What the in-guest benchmark and its driver share: the checksum of the bytes read and the
//! pseudo-random offsets of the 4 KiB random-read workload, so the driver can check on the host
//! that every VMM served the right bytes.

/// The block size of the random-read workload.
pub const RAND_BLOCK: u64 = 4096;

/// A checksum the driver recomputes on the host: FNV-1a over 8-byte little-endian words
/// (a short tail is zero-padded), order-sensitive so misplaced blocks are caught.
pub fn fold(mut acc: u64, bytes: &[u8]) -> u64 {
    for word in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        acc ^= u64::from_le_bytes(w);
        acc = acc.wrapping_mul(0x100_0000_01b3);
    }
    acc
}

pub const FOLD_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// xorshift64: the random offsets, reproducible from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The checksum `guest-fsbench rand` prints for `count` reads with `seed` from `data`.
pub fn rand_sum(data: &[u8], count: u64, seed: u64) -> Option<u64> {
    let blocks = data.len() as u64 / RAND_BLOCK;
    if blocks == 0 {
        return None;
    }
    let mut rng = Rng(seed.max(1));
    let mut sum = FOLD_SEED;
    for _ in 0..count {
        let offset = ((rng.next_u64() % blocks) * RAND_BLOCK) as usize;
        sum = fold(sum, &data[offset..offset + RAND_BLOCK as usize]);
    }
    Some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_is_order_sensitive_and_pads_the_tail() {
        let a = fold(FOLD_SEED, b"0123456789abcdef");
        let b = fold(FOLD_SEED, b"89abcdef01234567");
        assert_ne!(a, b);
        assert_eq!(fold(FOLD_SEED, b"abc"), fold(FOLD_SEED, b"abc\0\0\0\0\0"));
    }

    #[test]
    fn rand_sum_needs_a_whole_block() {
        assert_eq!(rand_sum(&[0u8; 100], 10, 7), None);
        let data: Vec<u8> = (0..3 * RAND_BLOCK).map(|i| (i % 251) as u8).collect();
        assert!(rand_sum(&data, 10, 7).is_some());
        assert_eq!(rand_sum(&data, 10, 7), rand_sum(&data, 10, 7));
    }
}
