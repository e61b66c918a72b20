//! Throughput of the block codec on 1 MiB blocks, the client's CPU cost per byte written and
//! read: `cargo bench -p cairn-block`. Incompressible data (most file data) and text-like
//! data, each with the default settings (zstd level 1, encrypted) and in the clear.

use cairn_block::{BlockId, Codec};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const BLOCK: usize = 1 << 20;

fn incompressible() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..BLOCK / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn text() -> Vec<u8> {
    let words = ["cairn ", "block ", "slice ", "chunk ", "lease ", "recall ", "fsync\n"];
    words.iter().cycle().flat_map(|w| w.bytes()).take(BLOCK).collect()
}

fn codecs() -> [(&'static str, Codec); 2] {
    let key = [7u8; cairn_block::KEY_LEN];
    [("default", Codec::new(1, &[(1, key)], Some(1)).unwrap()), ("plain", Codec::plain())]
}

fn bench(c: &mut Criterion) {
    let id = BlockId { slice: 42, index: 3 };
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for (data_name, data) in [("incompressible", incompressible()), ("text", text())] {
        for (codec_name, codec) in codecs() {
            g.bench_function(format!("encode/{codec_name}/{data_name}"), |b| {
                b.iter(|| codec.encode(id, black_box(&data)))
            });
            let block = codec.encode(id, &data);
            g.bench_function(format!("decode/{codec_name}/{data_name}"), |b| {
                b.iter(|| codec.decode(id, black_box(&block)).unwrap().len())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
