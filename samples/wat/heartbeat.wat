;; A long-running worker in WebAssembly text: prints "heartbeat" once a
;; second until stopped, blocked in `poll_oneoff` between beats. One page
;; of linear memory, no allocator, no shadow stack: the guest that holds
;; least, for measuring what a host keeps per long-running task beside the
;; guest's own memory (`benches/src/bin/task_memory.rs`).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; iovec { buf = 16, len = 10 } at 0; the byte count goes to 8.
  (data (i32.const 0) "\10\00\00\00\0a\00\00\00")
  (data (i32.const 16) "heartbeat\0a")
  ;; One clock subscription at 32 (userdata 0, tag 0 = clock): the
  ;; monotonic clock (1) at 48, a relative timeout of 1 s (10^9 ns) at 56.
  ;; Its event goes to 96, the event count to 128.
  (data (i32.const 48) "\01\00\00\00\00\00\00\00\00\ca\9a\3b\00\00\00\00")
  (func (export "_start")
    (loop $beat
      (drop (call $fd_write
        (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (drop (call $poll_oneoff
        (i32.const 32) (i32.const 96) (i32.const 1) (i32.const 128)))
      (br $beat)))
)
