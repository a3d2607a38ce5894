;; A WASI p1 command whose start divides by zero: the trap kind must be
;; reported as an integer division by zero.
(module
  (func $start (export "_start")
    (drop (i32.div_s (i32.const 7) (i32.const 0)))))
