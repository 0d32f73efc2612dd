//! Which machine code the engine makes: the Cranelift target of a level of each
//! architecture, the engines that compile for another architecture, and the key
//! that says which artifacts are interchangeable.
//!
//! Every level of one architecture compiles for the same fixed target, so a
//! level adopts the artifact its parent sent instead of compiling again; a
//! parent of another architecture makes that artifact with Cranelift's backend
//! for the child (built in: see `cranelift-codegen` in `runtime/Cargo.toml`).
//!
//! A runtime built without the `compiler` feature (the level runtime) has no
//! Cranelift: it cannot compute wasmtime's compatibility hash either, so it
//! takes the key of the first artifact its parent hands it ([`adopt_key`]) and
//! leaves the checks to `Component::deserialize`, which compares the artifact's
//! target, settings and CPU features with this engine and this CPU.

#[cfg(feature = "compiler")]
use std::collections::HashMap;
#[cfg(feature = "compiler")]
use std::hash::Hash;
use std::hash::Hasher;
use std::sync::Mutex;
#[cfg(feature = "compiler")]
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The architectures whose code this runtime can make, as `uname -m` names them:
/// both on x86_64, only its own on s390x (see `cranelift-codegen` in
/// `runtime/Cargo.toml`).
#[cfg(all(feature = "compiler", target_arch = "x86_64"))]
pub const ARCHES: &[&str] = &["x86_64", "s390x"];
/// The architectures whose code this runtime can make, as `uname -m` names them:
/// both on x86_64, only its own on s390x (see `cranelift-codegen` in
/// `runtime/Cargo.toml`).
#[cfg(all(feature = "compiler", not(target_arch = "x86_64")))]
pub const ARCHES: &[&str] = &[std::env::consts::ARCH];
/// The architectures whose code this runtime can make: none, it has no compiler.
#[cfg(not(feature = "compiler"))]
pub const ARCHES: &[&str] = &[];

/// Sets the compile target of a level of architecture `arch` (`uname -m`).
/// `native` says the engine runs code on this machine, whose CPU features can
/// then be checked before any is enabled.
///
/// - x86_64: a fixed baseline (x86-64-v2: SSE3 to SSE4.2, POPCNT) instead of the
///   CPU detected here: each level's CPU differs (the host's, TCG's `-cpu max`,
///   a nested KVM guest's), and with detected features an L2 here recompiled the
///   nested suite for 13.5 s. A native engine whose CPU lacks the baseline keeps
///   detection (and its own artifacts).
/// - s390x: Cranelift's z14 baseline, with no z15 extras, for the same reason.
#[cfg(feature = "compiler")]
pub(super) fn configure(
    config: &mut wasmtime::Config,
    arch: &str,
    native: bool,
) -> anyhow::Result<()> {
    match arch {
        "x86_64" => {
            if native && !x86_64_baseline_detected() {
                return Ok(());
            }
            let env = if cfg!(target_env = "musl") {
                "musl"
            } else {
                "gnu"
            };
            // A target, even the host's, turns off the detection of CPU features.
            config.target(&format!("x86_64-unknown-linux-{env}"))?;
            for flag in [
                "has_sse3",
                "has_ssse3",
                "has_sse41",
                "has_sse42",
                "has_popcnt",
            ] {
                // SAFETY: a native engine enables these only once they were
                // detected on this CPU (above); a cross engine runs none of the
                // code it makes, and the level that loads it checks its own CPU
                // for every enabled flag first (`Engine::check_compatible`).
                unsafe {
                    config.cranelift_flag_enable(flag);
                }
            }
            Ok(())
        }
        "s390x" => {
            config.target("s390x-unknown-linux-gnu")?;
            Ok(())
        }
        other => Err(no_backend(other)),
    }
}

fn no_backend(arch: &str) -> anyhow::Error {
    if !cfg!(feature = "compiler") {
        return anyhow::anyhow!(
            "no code generator for `{arch}` in this runtime: it is a level runtime, built without \
             the `compiler` feature"
        );
    }
    anyhow::anyhow!(
        "no code generator for `{arch}` in this runtime: known are {}",
        ARCHES.join(", ")
    )
}

#[cfg(feature = "compiler")]
fn x86_64_baseline_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("sse3")
            && std::is_x86_feature_detected!("ssse3")
            && std::is_x86_feature_detected!("sse4.1")
            && std::is_x86_feature_detected!("sse4.2")
            && std::is_x86_feature_detected!("popcnt")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The engine that compiles for levels of architecture `arch` from this one
/// (made once per architecture). It only compiles: nothing it makes runs here.
pub fn cross_engine(arch: &str) -> anyhow::Result<wasmtime::Engine> {
    if !ARCHES.contains(&arch) {
        return Err(no_backend(arch));
    }
    #[cfg(feature = "compiler")]
    {
        static ENGINES: OnceLock<Mutex<HashMap<String, wasmtime::Engine>>> = OnceLock::new();
        let engines = ENGINES.get_or_init(Mutex::default);
        let mut engines = engines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = engines.get(arch) {
            return Ok(engine.clone());
        }
        let mut config = super::base_config();
        configure(&mut config, arch, false)?;
        let engine = wasmtime::Engine::new(&config)?;
        engines.insert(arch.to_string(), engine.clone());
        Ok(engine)
    }
    #[cfg(not(feature = "compiler"))]
    unreachable!("a runtime without a compiler knows no architecture to compile for")
}

/// What makes precompiled artifacts interchangeable: engines with equal keys
/// (same wasmtime, same configuration, same target) load each other's artifacts.
/// The same on every architecture: wasmtime's compatibility hash is fed through
/// [`KeyHasher`], which reads every integer little-endian, into sha256.
#[cfg(feature = "compiler")]
pub fn engine_key(engine: &wasmtime::Engine) -> String {
    let mut h = KeyHasher::default();
    engine.precompile_compatibility_hash().hash(&mut h);
    h.hex()
}

/// The key of this machine's engine ([`super::engine`]): its own with a
/// compiler; without one, the key its parent's artifacts came under, once one
/// was adopted ([`adopt_key`]), else `None`.
pub fn native_key() -> Option<String> {
    #[cfg(feature = "compiler")]
    {
        // The process has one engine, so one key: hashed once.
        static KEY: OnceLock<String> = OnceLock::new();
        if let Some(key) = KEY.get() {
            return Some(key.clone());
        }
        let key = engine_key(&super::engine().ok()?);
        Some(KEY.get_or_init(|| key).clone())
    }
    #[cfg(not(feature = "compiler"))]
    {
        ADOPTED.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(not(feature = "compiler"))]
static ADOPTED: Mutex<Option<String>> = Mutex::new(None);

/// Whether `key` is shaped like an engine key: 16 lowercase hex digits (a
/// folder name in the cache, never a path).
pub fn is_key(key: &str) -> bool {
    key.len() == 16 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether an artifact a parent made under `key` may go into this engine's
/// cache folder. With a compiler: only when `key` is this engine's own (else
/// this level compiles). Without one: the first key a parent hands down
/// becomes this engine's, and others are refused (a level runs one component,
/// all from one parent); loading then checks the artifact itself.
pub fn adopt_key(key: &str) -> Result<(), String> {
    #[cfg(feature = "compiler")]
    {
        let own = native_key().unwrap_or_default();
        if key == own && is_key(key) {
            Ok(())
        } else {
            Err(format!(
                "the parent's artifact is for engine {key}, this level's is {own}"
            ))
        }
    }
    #[cfg(not(feature = "compiler"))]
    {
        if !is_key(key) {
            return Err(format!(
                "the parent's artifact came under {key:?}, not an engine key"
            ));
        }
        let mut adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
        match adopted.as_deref() {
            Some(own) if own != key => Err(format!(
                "the parent's artifact is for engine {key}, this level already took {own}'s"
            )),
            _ => {
                *adopted = Some(key.to_string());
                Ok(())
            }
        }
    }
}

/// A [`Hasher`] whose result does not depend on the machine's byte order (or on
/// the Rust release): integers are hashed as their little-endian bytes, and the
/// bytes go into sha256. `std`'s `DefaultHasher` hashes integers in native byte
/// order, so an x86_64 parent and an s390x child would name one engine twice.
#[derive(Default)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    /// The first 8 bytes of the digest, as 16 hex digits.
    pub fn hex(&self) -> String {
        hex::encode(&self.0.clone().finalize()[..8])
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn write_u8(&mut self, n: u8) {
        self.0.update([n]);
    }
    fn write_u16(&mut self, n: u16) {
        self.0.update(n.to_le_bytes());
    }
    fn write_u32(&mut self, n: u32) {
        self.0.update(n.to_le_bytes());
    }
    fn write_u64(&mut self, n: u64) {
        self.0.update(n.to_le_bytes());
    }
    fn write_u128(&mut self, n: u128) {
        self.0.update(n.to_le_bytes());
    }
    fn write_usize(&mut self, n: usize) {
        self.0.update((n as u64).to_le_bytes());
    }
    fn write_i8(&mut self, n: i8) {
        self.write_u8(n as u8);
    }
    fn write_i16(&mut self, n: i16) {
        self.write_u16(n as u16);
    }
    fn write_i32(&mut self, n: i32) {
        self.write_u32(n as u32);
    }
    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }
    fn write_i128(&mut self, n: i128) {
        self.write_u128(n as u128);
    }
    fn write_isize(&mut self, n: isize) {
        self.write_usize(n as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hash;

    /// What an s390x level computes for the same values: every integer as its
    /// little-endian bytes, whatever this machine's order.
    #[test]
    fn engine_keys_are_sixteen_hex_digits() {
        assert!(is_key("0123456789abcdef"));
        for not in [
            "",
            "0123456789abcde",
            "0123456789ABCDEF",
            "../0123456789ab",
            "components",
        ] {
            assert!(!is_key(not), "{not}");
        }
        #[cfg(feature = "compiler")]
        assert!(is_key(&native_key().expect("key")));
    }

    #[test]
    fn the_key_hasher_reads_integers_little_endian() {
        let mut typed = KeyHasher::default();
        (
            0x0102_0304_0506_0708u64,
            0x0a0bu16,
            -2i32,
            7usize,
            "cranelift",
        )
            .hash(&mut typed);
        let mut bytes = KeyHasher::default();
        bytes.write(&0x0102_0304_0506_0708u64.to_le_bytes());
        bytes.write(&0x0a0bu16.to_le_bytes());
        bytes.write(&(-2i32).to_le_bytes());
        bytes.write(&7u64.to_le_bytes());
        // `str`'s Hash: its bytes, then 0xff.
        bytes.write(b"cranelift");
        bytes.write(&[0xff]);
        assert_eq!(typed.hex(), bytes.hex());
        assert_eq!(typed.hex().len(), 16);
    }

    #[cfg(all(feature = "compiler", target_arch = "x86_64"))]
    #[test]
    fn a_cross_engine_for_each_known_architecture_has_its_own_key() {
        let keys: Vec<String> = ARCHES
            .iter()
            .map(|a| engine_key(&cross_engine(a).expect("cross engine")))
            .collect();
        assert_ne!(keys[0], keys[1], "{keys:?}");
        let err = cross_engine("mips").expect_err("no mips backend");
        assert!(err.to_string().contains("known are x86_64, s390x"), "{err}");
    }

    #[cfg(feature = "compiler")]
    #[test]
    fn this_machines_engine_and_its_cross_engine_share_a_key() {
        let native = super::super::engine().expect("engine");
        let cross = cross_engine(std::env::consts::ARCH).expect("cross engine");
        assert_eq!(engine_key(&native), engine_key(&cross));
    }
}
