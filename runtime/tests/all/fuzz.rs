//! Property-based fuzzing of what the runtime accepts as a guest: bytes
//! that are almost Wasm, almost WebAssembly text, or neither are refused
//! with an error, never a panic, and the runtime loads a real module
//! afterwards. A failure proptest finds is saved under
//! `proptest-regressions/` and replayed first from then on.

use proptest::prelude::*;
use wharf_runtime::Error;

fn almost_wasm() -> impl Strategy<Value = Vec<u8>> {
    let hello = wharf_testkit::wasm_bytes("hello", wharf_testkit::Target::P1);
    let len = hello.len();
    prop_oneof![
        // The real module, cut short or with bytes flipped.
        (0..len).prop_map({
            let hello = hello.clone();
            move |cut| hello[..cut].to_vec()
        }),
        (prop::collection::vec((0..len, any::<u8>()), 1..8)).prop_map({
            let hello = hello.clone();
            move |flips| {
                let mut b = hello.clone();
                for (at, v) in flips {
                    b[at] ^= v | 1;
                }
                b
            }
        }),
        // A magic number and junk; text-looking junk; anything.
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|mut junk| {
            let mut b = b"\0asm\x01\0\0\0".to_vec();
            b.append(&mut junk);
            b
        }),
        "\\(\\PC{0,200}".prop_map(String::into_bytes),
        ";;\\PC{0,100}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..256),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn almost_wasm_is_refused_or_loaded_never_a_panic(bytes in almost_wasm()) {
        static RT: std::sync::OnceLock<std::sync::Arc<wharf_runtime::Runtime>> =
            std::sync::OnceLock::new();
        let rt = RT.get_or_init(crate::runtime);
        match rt.load(&bytes) {
            Ok(_) => {}
            Err(Error::NotWasm | Error::Invalid(_) | Error::Unsupported(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
    }
}
