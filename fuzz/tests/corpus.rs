//! The fuzz targets on any toolchain (no nightly, no libFuzzer): each target runs over its seed
//! corpus (`corpus/<target>/`) and then over mutations of it from a small deterministic mutator
//! (byte flips, insertions of JSON tokens, deletions, splices), for `FUZZ_SECONDS` seconds per
//! target (default 5) or `FUZZ_ITERATIONS` inputs, seeded by `FUZZ_SEED`. A panic is reported
//! with the input, which is also written to `artifacts/<target>/`.
//!
//! `cargo test --release --manifest-path fuzz/Cargo.toml` (scripts/fuzz.sh does this when there
//! is no nightly toolchain).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"0",
    b"-0",
    b"1e400",
    b"1.5",
    b"18446744073709551616",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b"{{",
    b"}}",
    b"{{args.",
    b"{{resources.",
    b"/",
    b"\"events\":[",
    b"\"payload\":{}",
    b"\"id\":\"x\"",
    b"\"event\":\"a:b\"",
    b"\"webhook_id\":\"8d0f1a52-3c55-4bb4-9a43-2f6f7f0c1e10\"",
    b"\"sync_job_run_id\":\"3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11\"",
    b"\"created_at\":\"9999-12-31T23:59:59-23:59\"",
    b"\"created_at\":\"0000-01-01T00:00:00+23:59\"",
    b"\"callback_url\":\"http://[::1]/\"",
    b"\"depends_on\":\"a\"",
    b"\"loop_on\":\"a\"",
    b"\"type\":\"object\"",
    b"\"type\":\"array\"",
    b"\"required\":true",
    b"GMT",
    b"Mon, 01 Jan 9999 00:00:00 GMT",
    b" ",
    b"\t",
    b"\xff",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let i = rng.below(len + 1);
                input.splice(i..i, t.iter().copied());
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                input.drain(i..i + n);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk: Vec<u8> = input[i..i + n].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let i = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - i).min(128));
                    let at = rng.below(len + 1);
                    input.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            5 if len > 0 => {
                let i = rng.below(len);
                const BYTES: &[u8] = b"0123456789-+.:eE\"{}[]az/ ";
                input[i] = BYTES[rng.below(BYTES.len())];
            }
            _ => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next() as u8);
            }
        }
    }
    input.truncate(64 * 1024);
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn run(target: &str, f: fn(&[u8])) {
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir().join("corpus").join(target))
        .map(|d| d.filter_map(|e| std::fs::read(e.ok()?.path()).ok()).collect())
        .unwrap_or_default();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seed corpus for {target}");
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let iterations: u64 = std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let check = |input: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
            let out = dir().join("artifacts").join(target);
            let _ = std::fs::create_dir_all(&out);
            let name = format!(
                "crash-{:016x}",
                input.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64)
                    .wrapping_mul(0x100000001b3))
            );
            let _ = std::fs::write(out.join(&name), input);
            panic!(
                "{target} panicked on {:?} (written to fuzz/artifacts/{target}/{name})",
                String::from_utf8_lossy(input)
            );
        }
    };
    for s in &seeds {
        check(s);
    }
    let mut n = 0u64;
    let mut input = Vec::new();
    while n < iterations && Instant::now() < deadline {
        // Mostly fresh mutations of a seed, sometimes stacked on the previous input.
        if input.is_empty() || rng.below(4) != 0 {
            input = seeds[rng.below(seeds.len())].clone();
        }
        mutate(&mut rng, &seeds, &mut input);
        check(&input);
        n += 1;
    }
    eprintln!("{target}: {} seeds, {n} mutations", seeds.len());
}

#[test]
fn envelope() {
    run("envelope", syncrelay_fuzz::envelope);
}

#[test]
fn sync_job() {
    run("sync_job", syncrelay_fuzz::sync_job);
}

#[test]
fn retry_after() {
    run("retry_after", syncrelay_fuzz::retry_after);
}

#[test]
fn cursor() {
    run("cursor", syncrelay_fuzz::cursor);
}
