//! The CUDA program that NVRTC compiles: lion.cu, preceded by a prelude that `#define`s every
//! constant it shares with the Rust side and followed by `static_assert`s on the structs it
//! shares with the host, both generated here from the Rust definitions, so that lion.cu cannot
//! drift from them unnoticed.
//!
//! - The prelude: the dtype and decay-mode codes as `DType::raw` / `DecayMode::raw` give them
//!   to the kernels, the random streams, Cautious Lion's mean floor, the hash's constants,
//!   the launch shape of `args.rs`, the measured knobs of `tuning.rs`, and 8-bit momentum's
//!   block, minimum size, top level and NaN scale (`numerics::q8`) with the device layout's
//!   alignment (`plan::STATE_ALIGN`). lion.cu defines none of these and writes none of their
//!   values as a bare number (tested below).
//! - The layout checks, after lion.cu: for every struct of `args::LAYOUTS`, its size and each
//!   field's size, and each field's offset where `offsetof` is sure to work in a constant
//!   expression: on the host compiler, not under NVRTC (it has no `<cstddef>`, and whether
//!   `__builtin_offsetof` or a cast-based emulation is a constant expression there depends on
//!   its version). A field added, removed or resized on one side changes a size (no struct
//!   has padding: `args.rs` asserts it); a reordering shows in the offsets.
//!
//! NVRTC only runs on a GPU machine, so the tests below compile the prelude, lion.cu's kernel
//! interface section and the layout checks with the host's C++ compiler, with and without
//! `__CUDACC_RTC__`: a drifted lion.cu fails `cargo test` on any machine.

use std::ffi::CStr;
use std::fmt::{self, Write};

use super::args::{
    AGREE_DIFFERED, AGREE_FOUND_INF, AGREE_FP, AGREE_FP2, AGREE_NON_FINITE, AGREE_RANKS,
    AGREE_REFUSED, AGREE_SEND, AGREE_SUM, COUNTER_STEP, COUNTER_TICKET, CUDA_THREADS_PER_BLOCK,
    ELEMS, LAYOUTS, MAX_SLOTS, MAX_TENSORS, SIGNS_PER_THREAD, VOTE_I8, VOTE_PACKED, VOTE_TRITS,
};
use super::plan::STATE_ALIGN;
use super::tuning;
use crate::buffer::FallibleText;
use crate::config::{DType, DecayMode};
use crate::numerics::q8;
use crate::numerics::rng::{
    Stream, GOLDEN_GAMMA, HASH32_MUL1, HASH32_MUL2, MIX64_MUL1, MIX64_MUL2,
};
use crate::numerics::update::CAUTIOUS_MEAN_FLOOR;
use crate::status::{Error, Result};

/// The CUDA source, embedded at build time.
pub(crate) const LION_CU: &str = include_str!("lion.cu");

/// The knobs of the reference card (the tests and the offline compile).
#[cfg(test)]
pub(crate) fn reference_tuning() -> tuning::Tuning {
    tuning::Tuning::for_card(tuning::Card::default())
}

/// Every constant of the prelude: (name, C literal), the tuning knobs for the reference card.
#[cfg(test)]
pub(crate) fn constants() -> Vec<(&'static str, String)> {
    constants_for(&reference_tuning())
}

/// Every constant of the prelude, with the knobs of `tuning`.
fn constants_for(tuning: &tuning::Tuning) -> Vec<(&'static str, String)> {
    let u64_hex = |v: u64| format!("{v:#x}ull");
    let u32_hex = |v: u32| format!("{v:#x}u");
    let [min_f32, min_bf16, min_q8] = tuning.min_blocks;
    let [unroll_f32, unroll_bf16] = tuning.unroll;
    vec![
        ("LION_DTYPE_F32", DType::F32.raw().to_string()),
        ("LION_DTYPE_F16", DType::F16.raw().to_string()),
        ("LION_DTYPE_BF16", DType::BF16.raw().to_string()),
        ("LION_DTYPE_Q8", DType::Q8.raw().to_string()),
        ("LION_DECAY_STANDARD", DecayMode::Standard.raw().to_string()),
        (
            "LION_DECAY_DECOUPLED",
            DecayMode::Decoupled.raw().to_string(),
        ),
        (
            "LION_DECAY_CORRECTED",
            DecayMode::Corrected.raw().to_string(),
        ),
        ("STREAM_PARAM", (Stream::Param as u32).to_string()),
        ("STREAM_MOMENTUM", (Stream::Momentum as u32).to_string()),
        // Debug prints the shortest decimal that reads back as the same f64.
        ("CAUTIOUS_MEAN_FLOOR", format!("{CAUTIOUS_MEAN_FLOOR:?}")),
        ("MIX64_MUL1", u64_hex(MIX64_MUL1)),
        ("MIX64_MUL2", u64_hex(MIX64_MUL2)),
        ("GOLDEN_GAMMA", u64_hex(GOLDEN_GAMMA)),
        ("HASH32_MUL1", u32_hex(HASH32_MUL1)),
        ("HASH32_MUL2", u32_hex(HASH32_MUL2)),
        ("MAX_TENSORS", MAX_TENSORS.to_string()),
        ("MAX_SLOTS", MAX_SLOTS.to_string()),
        ("ELEMS", ELEMS.to_string()),
        ("CUDA_THREADS_PER_BLOCK", CUDA_THREADS_PER_BLOCK.to_string()),
        ("UNROLL_F32", unroll_f32.to_string()),
        ("UNROLL_BF16", unroll_bf16.to_string()),
        ("MIN_BLOCKS_F32", min_f32.to_string()),
        ("MIN_BLOCKS_BF16", min_bf16.to_string()),
        ("MIN_BLOCKS_Q8", min_q8.to_string()),
        ("Q8_L2_AHEAD", tuning.q8_l2_ahead.to_string()),
        ("Q8_STAGES", tuning.q8_stages.to_string()),
        ("Q8_SLOT_BYTES", tuning::Q8_SLOT_BYTES.to_string()),
        ("COUNTER_STEP", COUNTER_STEP.to_string()),
        ("COUNTER_TICKET", COUNTER_TICKET.to_string()),
        ("AGREE_SEND", AGREE_SEND.to_string()),
        ("AGREE_SUM", AGREE_SUM.to_string()),
        ("AGREE_RANKS", AGREE_RANKS.to_string()),
        ("AGREE_DIFFERED", AGREE_DIFFERED.to_string()),
        ("AGREE_REFUSED", AGREE_REFUSED.to_string()),
        ("AGREE_FOUND_INF", AGREE_FOUND_INF.to_string()),
        ("AGREE_NON_FINITE", AGREE_NON_FINITE.to_string()),
        ("AGREE_FP", AGREE_FP.to_string()),
        ("AGREE_FP2", AGREE_FP2.to_string()),
        ("VOTE_PACKED", VOTE_PACKED.to_string()),
        ("VOTE_I8", VOTE_I8.to_string()),
        ("VOTE_TRITS", VOTE_TRITS.to_string()),
        ("SIGNS_PER_THREAD", SIGNS_PER_THREAD.to_string()),
        // 8-bit momentum (numerics::q8) and its device layout (plan::state_layout).
        ("Q8_BLOCK", q8::BLOCK.to_string()),
        ("Q8_MIN_NUMEL", format!("{}ull", q8::MIN_NUMEL)),
        ("Q8_MAX_LEVEL", format!("{:?}f", q8::MAX_LEVEL)),
        ("Q8_NAN_SCALE_BITS", u32_hex(q8::NAN_SCALE_BITS)),
        ("Q8_MIN_SCALE_BITS", u32_hex(q8::MIN_SCALE_BITS)),
        ("Q8_MAX_SCALE_BITS", u32_hex(q8::MAX_SCALE_BITS)),
        ("STATE_ALIGN", format!("{STATE_ALIGN}ull")),
    ]
}

/// The `#define`s that go before lion.cu.
fn write_prelude(out: &mut impl Write, tuning: &tuning::Tuning) -> fmt::Result {
    out.write_str(
        "// The prelude of lion.cu: its constants, generated by liblion (src/cuda/prelude.rs)\n\
         // from the Rust definitions.\n",
    )?;
    for (name, value) in constants_for(tuning) {
        writeln!(out, "#define {name} {value}")?;
    }
    Ok(())
}

/// The `static_assert`s that go after lion.cu (or after its kernel interface section).
fn write_layout_checks(out: &mut impl Write) -> fmt::Result {
    out.write_str(
        "// The layout of the structs that lion.cu shares with the host, generated by liblion\n\
         // (src/cuda/prelude.rs) from src/cuda/args.rs.\n",
    )?;
    let differs = |what: String| format!("\"{what} differs between lion.cu and src/cuda/args.rs\"");
    for s in LAYOUTS {
        let name = s.name;
        let size = s.size;
        let message = differs(format!("the size of {name}"));
        writeln!(out, "static_assert(sizeof({name}) == {size}, {message});")?;
        for f in s.fields {
            let (field, size) = (f.name, f.size);
            let message = differs(format!("the size of {name}::{field}"));
            writeln!(
                out,
                "static_assert(sizeof((({name} *)0)->{field}) == {size}, {message});"
            )?;
        }
    }
    out.write_str("#ifndef __CUDACC_RTC__\n#include <cstddef>\n")?;
    for s in LAYOUTS {
        let name = s.name;
        for f in s.fields {
            let (field, offset) = (f.name, f.offset);
            let message = differs(format!("the offset of {name}::{field}"));
            writeln!(
                out,
                "static_assert(offsetof({name}, {field}) == {offset}, {message});"
            )?;
        }
    }
    out.write_str("#endif\n")
}

/// Writes the whole program with the knobs of `tuning`: prelude, lion.cu (errors name its own
/// lines), layout checks.
fn write_program(out: &mut impl Write, tuning: &tuning::Tuning) -> fmt::Result {
    write_prelude(out, tuning)?;
    write!(
        out,
        "#line 1 \"lion.cu\"\n{LION_CU}\n#line 1 \"lion.cu layout checks\"\n"
    )?;
    write_layout_checks(out)
}

/// The bytes written to it: the program's length, before its memory is reserved.
struct Length(usize);

impl Write for Length {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// lion.cu has no NUL, so the program's only one is the one `program_for` puts at its end.
const _: () = {
    let bytes = LION_CU.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i] != 0, "a NUL inside lion.cu");
        i += 1;
    }
};

/// The whole program with the knobs of `tuning` (`write_program`), NUL-terminated as NVRTC
/// reads it. Made at a process's first CUDA creation on a device, in memory reserved
/// fallibly (its length counted first): out of host memory there, that creation fails with
/// LION_ERROR_OUT_OF_MEMORY.
pub(crate) fn program_for(tuning: &tuning::Tuning) -> Result<Program> {
    let mut length = Length(0);
    write_program(&mut length, tuning).expect("counting takes every write");
    let what = "the CUDA program's text";
    let mut text = FallibleText::with_capacity(length.0 + 1, what)?;
    write_program(&mut text, tuning)
        .and_then(|()| text.write_char('\0'))
        .map_err(|_| Error::out_of_memory(format!("could not allocate {what}")))?;
    Ok(Program(text.into_string()))
}

/// The program's text with a NUL after it (lion.cu has none inside, the generated code none).
pub(crate) struct Program(String);

impl Program {
    /// As NVRTC takes it.
    pub fn as_c_str(&self) -> &CStr {
        CStr::from_bytes_with_nul(self.0.as_bytes()).expect("the program has one NUL, at its end")
    }

    /// Without the NUL.
    #[cfg(test)]
    pub fn text(&self) -> &str {
        &self.0[..self.0.len() - 1]
    }
}

/// The `#define`s that go before lion.cu, as text (the tests).
#[cfg(test)]
fn prelude(tuning: &tuning::Tuning) -> String {
    let mut out = String::new();
    write_prelude(&mut out, tuning).expect("a String takes every write");
    out
}

/// The layout checks, as text (the tests).
#[cfg(test)]
pub(crate) fn layout_checks() -> String {
    let mut out = String::new();
    write_layout_checks(&mut out).expect("a String takes every write");
    out
}

/// The whole program for the reference card, without its NUL (the tests and the offline
/// compile).
#[cfg(test)]
pub(crate) fn program() -> String {
    program_text_for(&reference_tuning())
}

/// The whole program with the knobs of `tuning`, without its NUL (the tests).
#[cfg(test)]
pub(crate) fn program_text_for(tuning: &tuning::Tuning) -> String {
    program_for(tuning)
        .expect("memory for the program")
        .text()
        .to_owned()
}

/// CUDA's keywords and lion.cu's intrinsics for the host's C++ compiler (and, with
/// `LION_EMU_RUNTIME` defined, the emulator that runs the kernels on the CPU).
#[cfg(test)]
pub(crate) const CUDA_STUBS: &str = include_str!("../../tests/c/emu_cuda.h");

/// The host's C++ compiler, as the build finds it (the tests that read lion.cu with it).
#[cfg(test)]
pub(crate) fn host_cxx() -> cc::Tool {
    let target = env!("LION_BUILD_TARGET");
    cc::Build::new()
        .cpp(true)
        .target(target)
        .host(target)
        .opt_level(0)
        .warnings(false)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .out_dir(std::env::temp_dir())
        .get_compiler()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEGIN: &str = "// ---- BEGIN KERNEL INTERFACE ----\n";
    const END: &str = "// ---- END KERNEL INTERFACE ----\n";

    /// lion.cu's kernel interface section, and the line it starts on.
    fn interface() -> (&'static str, usize) {
        let start = LION_CU
            .find(BEGIN)
            .expect("lion.cu has no BEGIN KERNEL INTERFACE line");
        let end = LION_CU
            .find(END)
            .expect("lion.cu has no END KERNEL INTERFACE line");
        assert!(start < end);
        let line = LION_CU[..start].lines().count() + 1;
        (&LION_CU[start..end + END.len()], line)
    }

    /// What NVRTC would check of `interface`, for the host compiler.
    fn checks_of(interface: &str, line: usize) -> String {
        format!(
            "{}#line {line} \"lion.cu\"\n{interface}#line 1 \"lion.cu layout checks\"\n{}",
            prelude(&reference_tuning()),
            layout_checks()
        )
    }

    const WARNINGS: &[&str] = &["-Wall", "-Wextra", "-Werror"];

    /// Compiles `source` as C++17 with the host's C++ compiler (the one the `cc` crate finds,
    /// as the C tests do) and `flags`, once as itself and once as NVRTC would see it
    /// (`__CUDACC_RTC__` defined). The compiler's messages on failure.
    fn host_compile(source: &str, flags: &[&str]) -> std::result::Result<(), String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "lion-kernel-interface-{}-{}.cpp",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, source).unwrap();
        let compiler = host_cxx();
        let mut errors = String::new();
        for nvrtc in [false, true] {
            let mut cmd = compiler.to_command();
            cmd.args(["-std=c++17", "-fsyntax-only"]).args(flags);
            if nvrtc {
                cmd.arg("-D__CUDACC_RTC__");
            }
            let out = cmd
                .arg(&path)
                .output()
                .expect("could not run the C++ compiler");
            if !out.status.success() {
                errors += &String::from_utf8_lossy(&out.stderr);
            }
        }
        let _ = std::fs::remove_file(&path);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The whole program (not only the interface) through the host's C++ compiler over stubs
    /// of CUDA's keywords and intrinsics: an undefined name (a constant misspelt or missing
    /// from the prelude), a type error or a template that does not instantiate shows here,
    /// not only under NVRTC on a GPU machine.
    #[test]
    fn the_host_compiler_reads_the_whole_program_over_cuda_stubs() {
        // With and without q8's ring (its code is compiled only where the tuning asks).
        for q8_stages in [0, 2] {
            let tuning = tuning::Tuning {
                q8_stages,
                ..reference_tuning()
            };
            let source = format!("{CUDA_STUBS}{}", program_text_for(&tuning));
            if let Err(e) = host_compile(&source, &["-Wno-unknown-pragmas"]) {
                panic!(
                    "the CUDA program ({q8_stages} ring stages) does not compile on the host:\n{e}"
                );
            }
        }
    }

    #[test]
    fn the_host_compiler_accepts_lion_cus_kernel_interface() {
        let (interface, line) = interface();
        if let Err(e) = host_compile(&checks_of(interface, line), WARNINGS) {
            panic!("lion.cu's kernel interface differs from src/cuda/args.rs:\n{e}");
        }
    }

    /// The checks have teeth: a field moved (the same size, so only an offset changes) and
    /// a field resized are both refused.
    #[test]
    fn a_drifted_kernel_interface_is_refused() {
        let (interface, line) = interface();
        let drifts = [
            (
                "  const float *lr_ptr;    // NULL, or the lr read now (CUDA graphs)\n  const float *found_inf; // NULL, or: skip the step when non-zero\n",
                "  const float *found_inf;\n  const float *lr_ptr;\n",
                "the offset of StepArgs::lr_ptr",
            ),
            ("  u32 len;\n", "  u64 len;\n", "the size of BlockChunk::len"),
            (
                "  float beta1, beta2, weight_decay,",
                "  float beta2, beta1, weight_decay,",
                "the offset of HyperArgs::beta1",
            ),
        ];
        for (from, to, complaint) in drifts {
            assert!(interface.contains(from), "lion.cu no longer has {from:?}");
            let drifted = interface.replacen(from, to, 1);
            match host_compile(&checks_of(&drifted, line), WARNINGS) {
                Ok(()) => panic!("a drifted lion.cu ({to:?}) was accepted"),
                Err(e) => assert!(e.contains(complaint), "{complaint}: {e}"),
            }
        }
    }

    #[test]
    fn the_prelude_reads_back_as_the_rust_values() {
        let c = constants();
        let get = |name: &str| c.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        assert_eq!(
            get("CAUTIOUS_MEAN_FLOOR").parse::<f64>(),
            Ok(CAUTIOUS_MEAN_FLOOR)
        );
        let hex = |name: &str, suffix: &str| {
            let v = get(name);
            u64::from_str_radix(
                v.strip_prefix("0x").unwrap().strip_suffix(suffix).unwrap(),
                16,
            )
            .unwrap()
        };
        assert_eq!(hex("MIX64_MUL1", "ull"), MIX64_MUL1);
        assert_eq!(hex("MIX64_MUL2", "ull"), MIX64_MUL2);
        assert_eq!(hex("GOLDEN_GAMMA", "ull"), GOLDEN_GAMMA);
        assert_eq!(hex("HASH32_MUL1", "u"), HASH32_MUL1 as u64);
        assert_eq!(hex("HASH32_MUL2", "u"), HASH32_MUL2 as u64);
        assert_eq!(hex("Q8_NAN_SCALE_BITS", "u"), q8::NAN_SCALE_BITS as u64);
        assert_eq!(hex("Q8_MIN_SCALE_BITS", "u"), q8::MIN_SCALE_BITS as u64);
        assert_eq!(hex("Q8_MAX_SCALE_BITS", "u"), q8::MAX_SCALE_BITS as u64);
        let max_level = get("Q8_MAX_LEVEL");
        assert_eq!(
            max_level.strip_suffix('f').unwrap().parse::<f32>(),
            Ok(q8::MAX_LEVEL)
        );
        assert_eq!(get("Q8_BLOCK").parse::<usize>(), Ok(q8::BLOCK));
        assert_eq!(get("Q8_MIN_NUMEL"), format!("{}ull", q8::MIN_NUMEL));
        let mut names: Vec<_> = c.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), c.len(), "a constant is defined twice");
    }

    /// A token of C source: an identifier, a number, or one punctuation character (`==` and
    /// `!=` as one).
    #[derive(Debug, PartialEq)]
    enum Token {
        Word(String),
        Number(String),
        Punct(String),
    }

    /// Tokens of `source` without its comments, with the line of each.
    fn tokens(source: &str) -> Vec<(Token, usize)> {
        let chars: Vec<char> = source.chars().collect();
        let (mut out, mut i, mut line) = (Vec::new(), 0, 1);
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied().unwrap_or('\0');
            if c == '\n' {
                line += 1;
                i += 1;
            } else if c.is_whitespace() || c == '\\' {
                i += 1;
            } else if c == '/' && next == '/' {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            } else if c == '/' && next == '*' {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    line += (chars[i] == '\n') as usize;
                    i += 1;
                }
                i += 2;
            } else if c.is_ascii_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push((Token::Word(chars[start..i].iter().collect()), line));
            } else if c.is_ascii_digit() || (c == '.' && next.is_ascii_digit()) {
                let start = i;
                let hex = c == '0' && (next == 'x' || next == 'X');
                while i < chars.len() {
                    let d = chars[i];
                    let exponent_sign = (d == '+' || d == '-')
                        && matches!(chars[i - 1], 'e' | 'E' | 'p' | 'P')
                        && (!hex || matches!(chars[i - 1], 'p' | 'P'));
                    if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                out.push((Token::Number(chars[start..i].iter().collect()), line));
            } else if (c == '=' || c == '!') && next == '=' {
                out.push((Token::Punct(format!("{c}=")), line));
                i += 2;
            } else {
                out.push((Token::Punct(c.to_string()), line));
                i += 1;
            }
        }
        out
    }

    /// The value of a C number literal: an integer, or a float as f64.
    #[derive(Debug, PartialEq)]
    enum Value {
        Int(u128),
        Float(f64),
    }

    fn value(literal: &str) -> Option<Value> {
        let l = literal.to_ascii_lowercase();
        if let Some(hex) = l.strip_prefix("0x") {
            let digits = hex.trim_end_matches(['u', 'l']);
            return u128::from_str_radix(digits, 16).ok().map(Value::Int);
        }
        let int = l.trim_end_matches(['u', 'l']);
        if let Ok(v) = int.parse::<u128>() {
            return Some(Value::Int(v));
        }
        l.trim_end_matches(['f', 'l'])
            .parse::<f64>()
            .ok()
            .map(Value::Float)
    }

    #[test]
    fn the_tokenizer_reads_numbers_whole() {
        let t: Vec<Token> = tokens("x = 1e-5 + 0x1fu; // 256\n/* 240 */ y[2] == 3.5f")
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let n = |s: &str| Token::Number(s.into());
        let w = |s: &str| Token::Word(s.into());
        let p = |s: &str| Token::Punct(s.into());
        assert_eq!(
            t,
            [
                w("x"),
                p("="),
                n("1e-5"),
                p("+"),
                n("0x1fu"),
                p(";"),
                w("y"),
                p("["),
                n("2"),
                p("]"),
                p("=="),
                n("3.5f")
            ]
        );
        assert_eq!(value("1e-5"), Some(Value::Float(1e-5)));
        assert_eq!(value("0.00001f"), Some(Value::Float(1e-5)));
        assert_eq!(value("0x7feb352du"), Some(Value::Int(0x7feb_352d)));
        assert_eq!(value("256"), Some(Value::Int(256)));
    }

    /// The constants of the prelude live only there: lion.cu does not define them again, and
    /// does not write their values as bare numbers (a copy that would not follow the Rust
    /// side). Small codes (0, 1, 2, 8) are common numbers, so for those the test looks at
    /// where a copy would be: compared with a field that holds a code, indexing the step
    /// counters, or as the stream of a key.
    #[test]
    fn lion_cu_has_no_copies_of_the_constants() {
        let toks = tokens(LION_CU);
        let mut problems = Vec::new();
        let constants = constants();
        for w in toks.windows(3) {
            if let [(Token::Punct(hash), line), (Token::Word(define), _), (Token::Word(name), _)] =
                w
            {
                if hash == "#" && define == "define" && constants.iter().any(|(n, _)| n == name) {
                    problems.push(format!(
                        "line {line}: defines {name}, which the prelude defines"
                    ));
                }
            }
        }
        // Distinctive values: any bare copy of them is one.
        let distinctive: Vec<(&str, Value)> = constants
            .iter()
            .filter_map(|(n, v)| match value(v)? {
                Value::Int(i) if i < 100 => None,
                v => Some((*n, v)),
            })
            .collect();
        assert!(distinctive.len() >= 8, "{distinctive:?}");
        for (t, line) in &toks {
            if let Token::Number(literal) = t {
                let v = value(literal);
                for (name, d) in &distinctive {
                    if v.as_ref() == Some(d) {
                        problems.push(format!("line {line}: {literal} is a copy of {name}"));
                    }
                }
            }
        }
        // Codes: compared with a field that holds one, or indexing the step counters.
        let code_fields = [
            "decay_mode",
            "state_dtype",
            "param_dtype",
            "grad_dtype",
            "DT",
            "P",
            "G",
            "S",
        ];
        for w in toks.windows(3) {
            if let [(Token::Word(field), line), (Token::Punct(op), _), (Token::Number(n), _)] = w {
                if code_fields.contains(&field.as_str()) && (op == "==" || op == "!=") {
                    problems.push(format!("line {line}: {field} {op} {n} (a bare code)"));
                }
            }
        }
        for w in toks.windows(4) {
            if let [(Token::Word(array), line), (Token::Punct(open), _), (Token::Number(n), _), (Token::Punct(close), _)] =
                w
            {
                if array == "step_counters" && open == "[" && close == "]" {
                    problems.push(format!("line {line}: step_counters[{n}] (a bare index)"));
                }
            }
        }
        // The stream of a key: make_key's last argument.
        for (i, (t, line)) in toks.iter().enumerate() {
            if *t == Token::Word("make_key".into()) && toks[i + 1].0 == Token::Punct("(".into()) {
                let close = toks[i..]
                    .iter()
                    .position(|(t, _)| *t == Token::Punct(")".into()));
                let last = &toks[i + close.unwrap() - 1].0;
                if let Token::Number(n) = last {
                    problems.push(format!("line {line}: make_key(.., {n}) (a bare stream)"));
                }
            }
        }
        for stale in ["module.rs may override", "#ifndef LION_UNROLL"] {
            if LION_CU.contains(stale) {
                problems.push(format!("lion.cu still says {stale:?}"));
            }
        }
        assert!(problems.is_empty(), "lion.cu:\n{}", problems.join("\n"));
    }
}
