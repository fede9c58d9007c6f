#!/bin/sh
# Import graph between the daemon's top-level modules: an edge A -> B for each
# `crate::B` path used in a file of module A (src/A.rs or src/A/...). Prints the
# edges, then the cycles found (none expected; exit 1 if any).
# By default the daemon only: test modules (from `#[cfg(test)]` to the end of a file)
# and the simulators, benchmark and demo (not part of the daemon) are left out;
# `--all` keeps them. Usage: scripts/import_graph.sh [--all] [src]
all=0
if [ "$1" = "--all" ]; then all=1; shift; fi
src=${1:-src}
python3 - "$src" "$all" <<'PY'
import os, re, sys
src = sys.argv[1]
everything = sys.argv[2] == "1"
NOT_DAEMON = {"sim", "bench", "demo"}
mods = {}
for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    if name in ("lib.rs", "main.rs"):
        continue
    stem = name[:-3] if name.endswith(".rs") else name
    if not everything and stem in NOT_DAEMON:
        continue
    if name.endswith(".rs"):
        if os.path.isdir(path[:-3]):
            continue  # a module with a directory: collected below
        mods[name[:-3]] = [path]
    elif os.path.isdir(path):
        files = []
        for root, _, fs in os.walk(path):
            files += [os.path.join(root, f) for f in fs if f.endswith(".rs")]
        mods[name] = files
        if os.path.exists(path + ".rs"):
            files.append(path + ".rs")
edges = {m: set() for m in mods}
pat = re.compile(r"\bcrate::(\w+)|\bcrate::\{([^}]*)\}")
for m, files in mods.items():
    for f in files:
        text = "\n".join(l for l in open(f).read().split("\n") if not l.strip().startswith("//"))
        if not everything:
            cut = text.find("#[cfg(test)]")
            if cut >= 0:
                text = text[:cut]
        # `use crate::{a::x, b}` groups: take every first segment
        for g in re.finditer(r"\buse\s+crate::\{", text):
            depth, i = 1, g.end()
            start = i
            while depth and i < len(text):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            body = text[start:i - 1]
            # first segments at top level of the group
            d = 0; tok = ""; seg = []
            for ch in body:
                if ch == "{": d += 1
                elif ch == "}": d -= 1
                elif ch == "," and d == 0:
                    seg.append(tok); tok = ""; continue
                tok += ch if d == 0 else ""
            seg.append(tok)
            for s in seg:
                s = s.strip().split("::")[0].strip()
                if s in mods and s != m:
                    edges[m].add(s)
        for g in re.finditer(r"\bcrate::(\w+)", text):
            s = g.group(1)
            if s in mods and s != m:
                edges[m].add(s)
for m in sorted(edges):
    print(f"{m} -> {', '.join(sorted(edges[m])) or '(none)'}")
# cycles: strongly connected components of size > 1
index = {}; low = {}; stack = []; on = set(); sccs = []; counter = [0]
def strong(v):
    index[v] = low[v] = counter[0]; counter[0] += 1
    stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1:
            sccs.append(sorted(comp))
for v in sorted(edges):
    if v not in index:
        strong(v)
if sccs:
    for c in sccs:
        print("CYCLE:", " <-> ".join(c))
    sys.exit(1)
print("no cycles")
PY
