;; Hello world as a WASI preview 1 command in WebAssembly text: runs without
;; any Wasm toolchain (`wharf run samples/wat/hello.wat`).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; iovec { buf = 16, len = 18 } at address 0; the text at address 16.
  (data (i32.const 0) "\10\00\00\00\12\00\00\00")
  (data (i32.const 16) "Hello from Wharf!\0a")
  (func (export "_start")
    (drop (call $fd_write
      (i32.const 1)    ;; stdout
      (i32.const 0)    ;; iovecs
      (i32.const 1)    ;; one iovec
      (i32.const 8)))) ;; where to store the byte count
)
