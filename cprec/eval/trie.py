"""A prefix trie over the token sequences of a domain's catalogue, for constrained generation.

Each candidate item is one token sequence (``PromptBuilder.next_item_ids``: separator + item text +
a terminator); the trie says which tokens may follow a generated prefix so that beam search can
only ever spell out catalogue items. A terminal node (reached after the terminator) holds the
indices of every item with exactly that sequence: items whose texts tokenize to the same ids are
*duplicates* the model cannot tell apart; they are counted (``duplicates``) and share one score.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class CatalogueTrie:
    """Children per node (token -> node), terminal node -> item indices (into the sequence list)."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences:
            raise ValueError("cannot build a trie over an empty catalogue")
        self.children: list[dict[int, int]] = [{}]
        self.parent: list[int] = [-1]
        self.below: list[int] = [0]
        """Items whose sequence passes through (or ends at) each node."""
        self.terminals: dict[int, list[int]] = {}
        self.item_node: list[int] = []
        """Terminal node of each item."""
        for index, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"item {index}: empty token sequence")
            node = 0
            self.below[0] += 1
            for token in seq:
                nxt = self.children[node].get(int(token))
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][int(token)] = nxt
                    self.children.append({})
                    self.parent.append(node)
                    self.below.append(0)
                node = nxt
                self.below[node] += 1
            self.terminals.setdefault(node, []).append(index)
            self.item_node.append(node)
        inner = [n for n in self.terminals if self.children[n]]
        if inner:  # a sequence that is a prefix of another: the terminator is missing
            item = self.terminals[inner[0]][0]
            raise ValueError(
                f"item {item}'s token sequence is a prefix of another item's: end every sequence "
                "with a terminator token"
            )
        self.depth = max(len(s) for s in sequences)
        """Tokens of the longest sequence: the most steps a generation needs."""
        self.n_items = len(sequences)

    def walk(self, prefix: Iterable[int]) -> int | None:
        """The node a prefix leads to, None when no catalogue item starts with it."""
        node: int | None = 0
        for token in prefix:
            node = self.children[node].get(int(token))
            if node is None:
                return None
        return node

    def match(self, tokens: Iterable[int]) -> int | None:
        """The first terminal node ``tokens`` reach (what follows it is ignored: padding after a
        finished generation), None when they leave the trie or stop before a terminal."""
        node: int | None = 0
        for token in tokens:
            node = self.children[node].get(int(token))
            if node is None or node in self.terminals:
                return node
        return None

    def items_at(self, node: int | None) -> list[int]:
        """Item indices ending at a node ([] for inner nodes and None)."""
        return self.terminals.get(node, []) if node is not None else []

    def blocked(self, exclude: Iterable[int]) -> dict[int, int]:
        """Per node, how many of the items in ``exclude`` (a user's history) lie below it."""
        out: dict[int, int] = {}
        for item in set(exclude):
            node = self.item_node[item]
            while node >= 0:
                out[node] = out.get(node, 0) + 1
                node = self.parent[node]
        return out

    def allowed(self, node: int, blocked: dict[int, int] | None = None) -> list[int]:
        """Tokens that may follow ``node``. With ``blocked`` (from `blocked`), a token is left out
        when every item below it is excluded, so the beam spends no slot on a path that can only
        end on the user's history items."""
        if not blocked:
            return list(self.children[node])
        return [t for t, c in self.children[node].items() if self.below[c] > blocked.get(c, 0)]

    def duplicates(self) -> list[list[int]]:
        """Groups (2 or more) of items whose sequences are identical."""
        return [list(v) for v in self.terminals.values() if len(v) > 1]

    def duplicate_counts(self) -> dict[str, int]:
        """``{"groups": g, "items": n}``: groups of identical sequences and the items in them."""
        groups = self.duplicates()
        return {"groups": len(groups), "items": sum(len(g) for g in groups)}
