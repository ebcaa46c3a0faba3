//! The control API's request reader and router with arbitrary bytes from a client, delivered
//! in pieces of arbitrary sizes: every input is a request, a clean close, or a 4xx answer,
//! never a panic, and never more than the bounded head and body are kept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::http::{read_request, ReadOutcome, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use vmm::api::routes::route;

/// A stream that hands out its bytes in pieces whose sizes the input chooses.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
}

impl std::io::Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = usize::from(self.sizes.get(self.turn % self.sizes.len().max(1)).copied().unwrap_or(255)).max(1);
        self.turn += 1;
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|input: &[u8]| {
    // The first byte says how many of the next bytes are piece sizes; the rest is the stream.
    let Some((&count, rest)) = input.split_first() else {
        return;
    };
    let (sizes, data) = rest.split_at(usize::from(count).min(rest.len()));
    let mut stream = Pieces { data, sizes, turn: 0 };
    let mut pending = Vec::new();
    for _ in 0..8 {
        match read_request(&mut stream, &mut pending) {
            ReadOutcome::Closed => break,
            ReadOutcome::Bad(response) => {
                assert!((400..600).contains(&response.status));
                break;
            }
            ReadOutcome::Request(request) => {
                assert!(request.body.len() <= MAX_BODY_BYTES);
                if let Err(response) = route(&request) {
                    assert!((400..500).contains(&response.status));
                }
            }
        }
        assert!(pending.len() <= MAX_HEAD_BYTES + 4096 + MAX_BODY_BYTES);
    }
});
