//! lion.cu's code run on the host, for twins that a GPU-less machine can check by value: the
//! program is compiled by the host's C++ compiler over the CUDA stubs (`prelude::CUDA_STUBS`)
//! with a `main` of the test's, and its output compared with the Rust twin's. Only code whose
//! threads do not talk to each other runs right this way (each thread runs to its end before
//! the next starts); the GPU tests (tests/cuda*.rs) check the kernels themselves.

use std::path::PathBuf;
use std::process::Command;

use super::prelude::{host_cxx, program, CUDA_STUBS};

/// Compiles the program with `main_body` as the body of `main`, runs it with `input` on its
/// stdin, and returns its stdout.
fn run_on_host(name: &str, main_body: &str, input: &str) -> String {
    let dir = std::env::temp_dir().join(format!("lion-on-host-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, exe): (PathBuf, PathBuf) = (dir.join("main.cpp"), dir.join("main"));
    let text = format!(
        "#define LION_EMU_RUNTIME\n{CUDA_STUBS}{}\n#include <cstdio>\n#include <vector>\n\
         int main() {{\n{main_body}\nreturn 0;\n}}\n",
        program()
    );
    std::fs::write(&source, text).unwrap();
    let out = host_cxx()
        .to_command()
        .args(["-std=c++17", "-O1", "-w", "-Wno-unknown-pragmas", "-o"])
        .arg(&exe)
        .arg(&source)
        .output()
        .expect("could not run the C++ compiler");
    assert!(
        out.status.success(),
        "lion.cu does not build on the host:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Command::new(&exe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the host build of lion.cu failed");
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stdout).unwrap()
}

fn numbers(line: &str) -> Vec<i64> {
    line.split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

/// lion_signs packs what `cpu::vote_codes::pack_trits` packs, and lion_apply's reading of
/// the results (`vote_trits`) decodes every byte, the 13 no rank sends too, as
/// `cpu::vote_codes::trit` does, from every thread's first element.
#[test]
fn the_cuda_vote_results_pack_and_unpack_as_the_cpus() {
    use crate::cpu::vote_codes::{pack_trits, trit, TRITS_PER_BYTE};
    use crate::dist::layout::VOTE_SLICE_ALIGN;
    // Sums over every i8 value, more than one block's threads take in one stride (256 * 40).
    let n = 3 * VOTE_SLICE_ALIGN as usize * 50;
    let sums: Vec<i8> = (0..n)
        .map(|i| match i % 7 {
            0 => 0,
            1 => i8::MIN,
            2 => i8::MAX,
            _ => ((i * 37 + i / 5) % 256) as u8 as i8,
        })
        .collect();
    let input: String = std::iter::once(n.to_string())
        .chain(sums.iter().map(|s| s.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let main = r#"
  unsigned long long n;
  if (scanf("%llu", &n) != 1) return 1;
  std::vector<u64> words(n / 8 + 1);
  u8 *sums = (u8 *)words.data();
  for (unsigned long long i = 0; i < n; i++) {
    int x;
    if (scanf("%d", &x) != 1) return 1;
    sums[i] = (u8)(signed char)x;
  }
  // One block (its threads stride past the first 256 * 40 sums), then two.
  for (unsigned grid = 1; grid <= 2; grid++) {
    std::vector<u64> out(n / 40);
    SignsArgs a = {sums, (u8 *)out.data(), n};
    gridDim.x = grid;
    for (blockIdx.x = 0; blockIdx.x < gridDim.x; blockIdx.x++)
      for (threadIdx.x = 0; threadIdx.x < CUDA_THREADS_PER_BLOCK; threadIdx.x++) lion_signs(a);
    for (unsigned long long i = 0; i < n / 5; i++) printf("%u ", ((u8 *)out.data())[i]);
    printf("\n");
  }
  std::vector<u8> every(256 + 8);
  for (int b = 0; b < 256; b++) every[b] = (u8)b;
  for (u64 e = 0; e < 5 * 256; e += ELEMS) {
    int r[ELEMS];
    vote_trits(every.data(), e, r);
    for (int j = 0; j < ELEMS; j++) printf("%d ", r[j]);
  }
  printf("\n");
"#;
    let out = run_on_host("trits", main, &input);
    let mut lines = out.lines();
    let cuda_bytes_one_block = numbers(lines.next().unwrap());
    let cuda_bytes = numbers(lines.next().unwrap());
    let mut cpu_bytes = vec![0u8; n / TRITS_PER_BYTE];
    // SAFETY: n sums, n / 5 bytes.
    unsafe { pack_trits(sums.as_ptr(), cpu_bytes.as_mut_ptr(), 0..n / TRITS_PER_BYTE) };
    let cpu_bytes: Vec<i64> = cpu_bytes.iter().map(|&b| b as i64).collect();
    assert!(cuda_bytes == cpu_bytes, "lion_signs packs other bytes");
    assert!(
        cuda_bytes_one_block == cpu_bytes,
        "lion_signs packs other bytes when a thread takes two strides"
    );
    let cuda_results = numbers(lines.next().unwrap());
    let cpu_results: Vec<i64> = (0..5 * 256)
        .map(|e| trit((e / 5) as u8, e % 5) as i64)
        .collect();
    assert!(
        cuda_results == cpu_results,
        "vote_trits reads other results"
    );
}
