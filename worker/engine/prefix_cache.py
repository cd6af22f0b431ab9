"""Which KV cells hold which token prefixes: a radix tree over the one KV pool that every sequence shares.

Every sequence llama.cpp knows (a running slot, or a cache entry kept after its job ended) is a path from the root.
A node is a run of cells at consecutive positions; it lives while some sequence's path goes through it, and a cell
shared by several sequences (tagged with several seq ids in llama.cpp's unified cache) is counted once. A new job
takes the longest prefix the tree holds into its own sequence (llama_memory_seq_cp only tags cells: no copy, no
memory) and prefills the rest. Entries are evicted least recently used first; evicting one frees only the cells no
other sequence goes through.

Plain Python, no llama.cpp: the scheduler does the llama.cpp side through its SlotResources.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    tokens: list[int]
    start: int  # the position of its first token
    parent: Node | None
    children: dict[int, Node] = field(default_factory=dict)  # by first token: what lookups can find
    shadows: list[Node] = field(default_factory=list)  # same first token as a child, other cells: not found
    seqs: set[int] = field(default_factory=set)  # the sequences whose path goes through this node

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class Match:
    node: Node  # the deepest node the prefix reaches (the root when nothing matched)
    length: int  # tokens matched; the node holds positions up to here (length may be inside the node)

    def source(self) -> int | None:
        """A sequence whose cells hold the whole matched prefix."""
        return min(self.node.seqs) if self.node.seqs else None


class PrefixCache:
    def __init__(self) -> None:
        self.root = Node([], 0, None)
        self.leaf: dict[int, Node] = {}  # sequence → the last node of its path
        self.length: dict[int, int] = {}  # sequence → tokens on its path (its KV cells)
        self.cells_used = 0

    # ---- lookups ---------------------------------------------------------------------------------------------

    def match(self, tokens: list[int]) -> Match:
        node: Node = self.root
        n = 0
        while n < len(tokens):
            child = node.children.get(tokens[n])
            if child is None:
                break
            k = 0
            while k < len(child.tokens) and n + k < len(tokens) and child.tokens[k] == tokens[n + k]:
                k += 1
            n += k
            node = child
            if k < len(child.tokens):
                break
        return Match(node, n)

    def tokens_of(self, seq: int) -> list[int]:
        path: list[list[int]] = []
        node = self.leaf.get(seq)
        while node is not None:
            path.append(node.tokens)
            node = node.parent
        return [t for run in reversed(path) for t in run]

    # ---- sequences -------------------------------------------------------------------------------------------

    def attach(self, seq: int, match: Match) -> None:
        """`seq` (new, empty) now shares the matched prefix's cells."""
        assert seq not in self.leaf, f"sequence {seq} is already in the tree"
        leaf = self._split(match.node, match.length)
        self.leaf[seq] = leaf
        self.length[seq] = match.length
        node: Node | None = leaf
        while node is not None and node is not self.root:
            node.seqs.add(seq)
            node = node.parent

    def extend(self, seq: int, tokens: list[int]) -> None:
        """Cells for these tokens were decoded into `seq`, after its path."""
        if not tokens:
            return
        leaf = self.leaf.get(seq) or self.root
        if seq not in self.leaf:
            self.attach(seq, Match(self.root, 0))
        if leaf is not self.root and leaf.seqs == {seq} and not leaf.children and not leaf.shadows:
            leaf.tokens.extend(tokens)  # its own tip: grow it
        else:
            node = Node(list(tokens), self.length[seq], leaf, seqs={seq})
            if tokens[0] in leaf.children:
                leaf.shadows.append(node)
            else:
                leaf.children[tokens[0]] = node
            self.leaf[seq] = node
        self.length[seq] += len(tokens)
        self.cells_used += len(tokens)

    def move(self, src: int, dst: int) -> None:
        """`src`'s cells now belong to `dst` (llama.cpp: seq_cp to dst, then seq_rm src)."""
        leaf = self.leaf.pop(src)
        self.leaf[dst] = leaf
        self.length[dst] = self.length.pop(src)
        node: Node | None = leaf
        while node is not None and node is not self.root:
            node.seqs.discard(src)
            node.seqs.add(dst)
            node = node.parent

    def release(self, seq: int) -> int:
        """`seq` is gone (llama.cpp: seq_rm); its cells that no other sequence holds are free. Returns how many."""
        node = self.leaf.pop(seq, None)
        self.length.pop(seq, None)
        freed = 0
        while node is not None and node is not self.root:
            node.seqs.discard(seq)
            parent = node.parent
            if not node.seqs:
                assert parent is not None
                freed += len(node.tokens)
                if parent.children.get(node.tokens[0]) is node:
                    del parent.children[node.tokens[0]]
                    promoted = next((s for s in parent.shadows if s.tokens[0] == node.tokens[0]), None)
                    if promoted is not None:  # a twin with its own cells becomes findable
                        parent.shadows.remove(promoted)
                        parent.children[node.tokens[0]] = promoted
                else:
                    parent.shadows.remove(node)
            node = parent
        self.cells_used -= freed
        return freed

    def unique_cells(self, seq: int) -> int:
        """Cells only `seq` holds: what releasing it would free."""
        n, node = 0, self.leaf.get(seq)
        while node is not None and node is not self.root and node.seqs == {seq}:
            n += len(node.tokens)
            node = node.parent
        return n

    def cells_held_only_by(self, seqs: set[int]) -> int:
        n, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            for child in [*node.children.values(), *node.shadows]:
                if child.seqs <= seqs:
                    n += len(child.tokens)
                stack.append(child)
        return n

    def _split(self, node: Node, length: int) -> Node:
        """The node that ends exactly at `length` on this path (splitting `node` when the length falls inside)."""
        if node is self.root or length >= node.end:
            return node
        assert node.start < length, "a match ends inside the node it reaches"
        k = length - node.start
        parent = node.parent
        assert parent is not None
        head = Node(node.tokens[:k], node.start, parent, seqs=set(node.seqs))
        if parent.children.get(node.tokens[0]) is node:
            parent.children[node.tokens[0]] = head
        else:
            parent.shadows[parent.shadows.index(node)] = head
        node.tokens = node.tokens[k:]
        node.start = length
        node.parent = head
        head.children[node.tokens[0]] = node
        return head

    def check(self) -> None:
        """Every invariant the accounting relies on (tests)."""
        seen_cells = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            kids = list(node.children.values()) + node.shadows
            for child in kids:
                assert child.parent is node and child.start == node.end and child.tokens
                assert child.seqs and child.seqs <= (node.seqs if node is not self.root else child.seqs)
                seen_cells += len(child.tokens)
            stack.extend(kids)
        assert seen_cells == self.cells_used, (seen_cells, self.cells_used)
        for seq, leaf in self.leaf.items():
            assert leaf.end == self.length[seq] and (seq in leaf.seqs or leaf is self.root)
