;; Fills 64 MiB of memory over and over: `memory.fill` is one long
;; instruction, the worst case for a scheduler that waits for guests to
;; yield. Used by the guest-isolation test and benchmark.
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1024)
  (func (export "_start")
    (loop $again
      (memory.fill (i32.const 0) (i32.const 1) (i32.const 67108864))
      (br $again))))
