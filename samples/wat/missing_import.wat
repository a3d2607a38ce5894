;; Imports a function no host provides: the task cannot start, and the
;; message must name the import.
(module
  (import "env" "launch_rockets" (func $launch))
  (func (export "_start") (call $launch)))
