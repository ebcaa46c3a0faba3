//! A stand-in for a hostile (or a node's) redis/zdb server in unit tests: it records every
//! command it receives and answers GET with a fixed payload.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

type Commands = Arc<Mutex<Vec<Vec<Vec<u8>>>>>;

pub(crate) struct FakeRedis {
    pub port: u16,
    received: Commands,
}

fn read_line(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    (r.read_line(&mut line).ok()? > 0).then(|| line.trim_end().to_string())
}

fn read_command(r: &mut impl BufRead) -> Option<Vec<Vec<u8>>> {
    let n: usize = read_line(r)?.strip_prefix('*')?.parse().ok()?;
    let mut words = Vec::new();
    for _ in 0..n {
        let len: usize = read_line(r)?.strip_prefix('$')?.parse().ok()?;
        let mut word = vec![0; len + 2];
        r.read_exact(&mut word).ok()?;
        word.truncate(len);
        words.push(word);
    }
    Some(words)
}

fn serve(conn: TcpStream, received: Commands, payload: Arc<Vec<u8>>) -> Option<()> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut conn = conn;
    loop {
        let cmd = read_command(&mut reader)?;
        let name = cmd.first()?.to_ascii_uppercase();
        received.lock().ok()?.push(cmd);
        match name.as_slice() {
            b"GET" => {
                conn.write_all(format!("${}\r\n", payload.len()).as_bytes())
                    .ok()?;
                conn.write_all(&payload).ok()?;
                conn.write_all(b"\r\n").ok()?;
            }
            b"EXISTS" => conn.write_all(b":0\r\n").ok()?,
            _ => conn.write_all(b"+OK\r\n").ok()?,
        }
    }
}

impl FakeRedis {
    /// Listens on 127.0.0.1 (a free port); GET answers `payload`.
    pub fn start(payload: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test port");
        let port = listener.local_addr().expect("local address").port();
        let received = Commands::default();
        let rec = received.clone();
        let payload = Arc::new(payload);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (rec, payload) = (rec.clone(), payload.clone());
                std::thread::spawn(move || serve(conn, rec, payload));
            }
        });
        FakeRedis { port, received }
    }

    /// Every command received so far.
    pub fn received(&self) -> Vec<Vec<Vec<u8>>> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The commands as text, one per line, words separated by spaces.
    pub fn received_text(&self) -> String {
        self.received()
            .iter()
            .map(|c| {
                c.iter()
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
