;; A valid component that exports nothing: not a command, so it must be
;; refused with a message about the unsupported world.
(component)
