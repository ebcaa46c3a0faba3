//! `flist_fs::chunk::decode` on hostile (id, stored bytes, key, plain_len), and the roundtrip
//! `encode` -> `decode`. The decoder must never return anything but exactly `plain_len` bytes
//! that hash (and, encrypted, key) as claimed, and never allocate past the claimed size: the
//! target runs under `-rss_limit_mb`/`-malloc_limit_mb` (scripts/fuzz.sh) well below what an
//! unbounded zstd bomb would take.
#![no_main]

use arbitrary::Arbitrary;
use flist_fs::chunk::{decode, encode, max_stored_size, ChunkId, MAX_CHUNK_SIZE};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Stored {
    /// Raw stored bytes (almost always rejected by the id check unless `id_of_stored`).
    Raw(Vec<u8>),
    /// A zstd frame of these bytes, possibly truncated or with a byte flipped.
    Zstd {
        plain: Vec<u8>,
        repeat: u16,
        cut: u16,
        flip: Option<(u16, u8)>,
    },
}

#[derive(Arbitrary, Debug)]
enum PlainLen {
    /// The length the data really has, give or take a little.
    Near(i8),
    Any(u32),
}

#[derive(Arbitrary, Debug)]
struct Input {
    stored: Stored,
    /// Make the id match the stored bytes (to get past the hash check).
    id_of_stored: bool,
    id: [u8; 32],
    key: Option<[u8; 32]>,
    plain_len: PlainLen,
    /// Roundtrip data and whether to encrypt it.
    roundtrip: Vec<u8>,
    encrypt: bool,
}

fuzz_target!(|input: Input| {
    // Roundtrip: what encode produces, decode gives back exactly.
    let data = &input.roundtrip;
    if !data.is_empty() {
        let e = encode(data, input.encrypt).expect("encode");
        assert_eq!(e.key.is_some(), input.encrypt);
        assert_eq!(e.id, ChunkId::of(&e.stored));
        assert!(
            e.stored.len() <= max_stored_size(data.len() as u32),
            "stored larger than the bound"
        );
        let back = decode(&e.id, &e.stored, e.key.as_ref(), data.len() as u32).expect("decode");
        assert_eq!(&back, data, "roundtrip");
        // Any other length is refused.
        for wrong in [data.len() as u32 - 1, data.len() as u32 + 1] {
            assert!(
                decode(&e.id, &e.stored, e.key.as_ref(), wrong).is_err(),
                "wrong length {wrong} accepted"
            );
        }
        // The wrong key (or none) is refused.
        if let Some(k) = e.key {
            let mut bad = k;
            bad[0] ^= 1;
            assert!(decode(&e.id, &e.stored, Some(&bad), data.len() as u32).is_err());
        }
    }

    // Hostile chunks.
    let (stored, real_len) = match &input.stored {
        Stored::Raw(b) => (b.clone(), None),
        Stored::Zstd {
            plain,
            repeat,
            cut,
            flip,
        } => {
            // Highly compressible data (a small bomb): `plain` repeated up to 64 Ki times.
            let plain: Vec<u8> = plain
                .iter()
                .copied()
                .cycle()
                .take(plain.len() * (usize::from(*repeat % 1024) + 1))
                .collect();
            let mut z = zstd::bulk::compress(&plain, 3).unwrap();
            if *cut > 0 {
                z.truncate(z.len().saturating_sub(usize::from(*cut % 64)));
            }
            if let Some((at, x)) = flip {
                if !z.is_empty() {
                    let i = usize::from(*at) % z.len();
                    z[i] ^= x;
                }
            }
            (z, Some(plain.len()))
        }
    };
    let id = if input.id_of_stored {
        ChunkId::of(&stored)
    } else {
        ChunkId(input.id)
    };
    let plain_len = match input.plain_len {
        PlainLen::Near(d) => (real_len.unwrap_or(stored.len()) as i64 + i64::from(d))
            .clamp(0, u32::MAX as i64) as u32,
        PlainLen::Any(n) => n,
    };
    match decode(&id, &stored, input.key.as_ref(), plain_len) {
        Ok(plain) => {
            assert_eq!(plain.len(), plain_len as usize, "decoded to another length");
            assert!(plain_len >= 1 && plain_len <= MAX_CHUNK_SIZE);
            assert!(stored.len() <= max_stored_size(plain_len));
            assert_eq!(id, ChunkId::of(&stored), "accepted with the wrong id");
            if input.key.is_none() {
                let z = zstd::stream::decode_all(stored.as_slice()).expect("accepted bad zstd");
                assert_eq!(z, plain);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&id.to_hex()),
                "error does not name the chunk: {msg}"
            );
        }
    }
});
