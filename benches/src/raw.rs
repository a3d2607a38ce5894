//! The raw-wasmtime arm: the same task run on the very same engine with
//! no Wharf code in between — a WASI context with captured output, a
//! `Store` with fuel, an epoch deadline and a memory limit, instantiate
//! from a pre-instantiation, run `_start` (p1) or `wasi:cli/run` (p2).
//! What Wharf adds on top (its task spec, limiter, supervision, outcome)
//! is the difference the harness reports.

use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Engine, InstancePre, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Output kept per task, as the harness's Wharf arm keeps.
const RETAINED: usize = 64 << 10;
/// Linear memory a task may hold, as the benchmark runtimes' cap.
const MEMORY: usize = 64 << 20;

struct P1 {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

struct P2 {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for P2 {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A sample prepared for raw runs.
pub struct Raw(Kind);

enum Kind {
    /// A core module (`wasm32-wasip1`).
    P1(Engine, InstancePre<P1>),
    /// A command component (`wasm32-wasip2`).
    P2(Engine, CommandPre<P2>),
}

fn wasi(out: &MemoryOutputPipe, args: &[&str]) -> WasiCtxBuilder {
    let mut b = WasiCtxBuilder::new();
    b.stdout(out.clone()).stderr(out.clone()).args(args);
    b
}

fn store<T>(engine: &Engine, state: T) -> Store<T> {
    let mut store = Store::new(engine, state);
    if engine.get_consume_fuel() {
        store.set_fuel(u64::MAX).expect("fuel is on");
    }
    store.epoch_deadline_callback(|_| Ok(wasmtime::UpdateDeadline::Yield(1)));
    store.set_epoch_deadline(1);
    store
}

impl Raw {
    /// Compiles `bytes` (a p1 module or a p2 command) on `engine`.
    pub fn new(engine: &Engine, bytes: &[u8]) -> Raw {
        if wasmparser::Parser::is_component(bytes) {
            let component = Component::new(engine, bytes).expect("component compiles");
            let mut linker = wasmtime::component::Linker::<P2>::new(engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("link WASI p2");
            let pre = linker.instantiate_pre(&component).expect("pre-instantiate");
            Raw(Kind::P2(
                engine.clone(),
                CommandPre::new(pre).expect("a command"),
            ))
        } else {
            let module = Module::new(engine, bytes).expect("module compiles");
            let mut linker = Linker::<P1>::new(engine);
            wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut P1| &mut s.wasi)
                .expect("link WASI p1");
            Raw(Kind::P1(
                engine.clone(),
                linker.instantiate_pre(&module).expect("pre-instantiate"),
            ))
        }
    }

    /// One run of the hello sample to its end; panics unless it exits 0.
    pub async fn run(&self) {
        let out = Raw::output();
        self.run_with(&["hello"], &out).await;
        debug_assert!(!out.contents().is_empty());
    }

    /// Output captured as the harness's Wharf arm captures it.
    pub fn output() -> MemoryOutputPipe {
        MemoryOutputPipe::new(RETAINED)
    }

    /// One run with `args` (the program's name first), its stdout and
    /// stderr into `out`, to its end; panics unless it exits 0. A guest
    /// that never returns holds its store, instance and stack for as long
    /// as this future is.
    pub async fn run_with(&self, args: &[&str], out: &MemoryOutputPipe) {
        let limits = StoreLimitsBuilder::new().memory_size(MEMORY).build();
        match &self.0 {
            Kind::P1(engine, pre) => {
                let mut store = store(
                    engine,
                    P1 {
                        wasi: wasi(out, args).build_p1(),
                        limits,
                    },
                );
                store.limiter(|s| &mut s.limits);
                let instance = pre
                    .instantiate_async(&mut store)
                    .await
                    .expect("instantiate");
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .expect("_start");
                if let Err(e) = start.call_async(&mut store, ()).await {
                    let code = e.downcast_ref::<I32Exit>().map(|e| e.0);
                    assert_eq!(code, Some(0), "{e:?}");
                }
            }
            Kind::P2(engine, pre) => {
                let mut store = store(
                    engine,
                    P2 {
                        wasi: wasi(out, args).build(),
                        table: ResourceTable::new(),
                        limits,
                    },
                );
                store.limiter(|s| &mut s.limits);
                let command = pre
                    .instantiate_async(&mut store)
                    .await
                    .expect("instantiate");
                let ran = command.wasi_cli_run().call_run(&mut store).await;
                assert!(matches!(ran, Ok(Ok(()))), "{ran:?}");
            }
        }
    }
}
