#!/usr/bin/env python3
"""Where a process's resident memory is, by kind of mapping.

Usage: benches/memory-breakdown.py PID

Groups the anonymous and memfd mappings of /proc/PID/smaps by (size,
permissions, name) and prints resident and anonymous KiB per group, largest
first. With wasmtime's pooling allocator, per-task structures show up as
groups of many equal mappings (one per pool slot): the fiber stacks
(`async_stack_size`, 2 MiB rw), each linear memory's accessible part (split
around the copy-on-write `memfd:wasm-memory-image` of its data segments),
while the host's heap is the few large glibc arenas. Run it while a service
of N long-running tasks holds (e.g. during `api_load PARTS=service`) and
divide a group's figure by N. Method and results: docs/PERFORMANCE.md,
"Memory per long-running task".
"""
import collections
import re
import sys


def main() -> None:
    pid = sys.argv[1]
    vmas = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
            if m:
                cur = {
                    "size": int(m.group(2), 16) - int(m.group(1), 16),
                    "perm": m.group(3),
                    "name": m.group(4).strip(),
                    "rss": 0,
                    "anon": 0,
                }
                vmas.append(cur)
                continue
            key, _, value = line.partition(":")
            if key == "Rss":
                cur["rss"] = int(value.split()[0])
            elif key == "Anonymous":
                cur["anon"] = int(value.split()[0])
    groups = collections.defaultdict(lambda: [0, 0, 0])
    for v in vmas:
        if v["name"] and "memfd" not in v["name"]:
            continue
        g = groups[(v["size"] // 1024, v["perm"], v["name"].split("/")[-1][:40])]
        g[0] += v["rss"]
        g[1] += v["anon"]
        g[2] += 1
    print(f"{'rss KiB':>10} {'anon KiB':>10} {'count':>6} {'size KiB':>12} perm name")
    for (size, perm, name), (rss, anon, n) in sorted(groups.items(), key=lambda x: -x[1][0])[:25]:
        print(f"{rss:>10} {anon:>10} {n:>6} {size:>12} {perm} {name}")


if __name__ == "__main__":
    main()
