"""The FUSE inode table: node ids, lookup counts, forget.

pyfuse3 uses one number as the FUSE node id and as the st_ino that stat shows, so node ids are
the union's inode numbers (`Union.inode_number`: derived from real inode numbers, kept across
copy-up), never a counter: hard links of one file are one node, and a remount gives the same ids.
"""

import errno
import logging
from collections.abc import Callable, Mapping
from typing import NewType

from cowfs.lookup import Directory, DirectoryFds, Entry
from cowfs.union import ROOT_INO, Union

log = logging.getLogger(__name__)

NodeId = NewType("NodeId", int)   # FUSE node id, which is also st_ino
ROOT_ID = NodeId(ROOT_INO)        # FUSE_ROOT_ID: the kernel's name for the mount's root


class Node:
    """A file the kernel knows: its entry (the file itself, whatever happens to its names)."""

    __slots__ = ("entry", "id", "lookups")

    def __init__(self, node_id: NodeId, entry: Entry) -> None:
        self.id = node_id
        self.entry = entry
        self.lookups = 0      # how many times the kernel was told of this node, less forgets


class InodeTable:
    """The nodes the kernel knows, by id; each lives until the kernel forgets it.

    A node holds its entry, so the entry, and a removed file's pinned fd with it, lives as
    long as the kernel may still send requests for it.
    """

    def __init__(self, union: Union, fds: DirectoryFds,
                 on_replaced: Callable[[NodeId], None] = lambda node_id: None) -> None:
        """*on_replaced* hears of a node whose number now names another directory: what the
        kernel cached of the old one (its listing) must go."""
        self._union = union
        self._fds = fds
        self._on_replaced = on_replaced
        self._nodes: dict[NodeId, Node] = {ROOT_ID: Node(ROOT_ID, union.root)}
        self.peak = 1         # the most nodes known at once since the table last shrank

    def __len__(self) -> int:
        return len(self._nodes)

    def id_for(self, entry: Entry) -> NodeId:
        return NodeId(self._union.inode_number(entry))

    def known_id(self, entry: Entry) -> NodeId | None:
        """*entry*'s node id if the kernel knows it as that node, else None."""
        node = self._nodes.get(self.id_for(entry))
        return node.id if node is not None and node.entry is entry else None

    def get(self, node_id: int) -> Node:
        try:
            return self._nodes[NodeId(node_id)]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown node {node_id}") from None

    def remember(self, entry: Entry, node_id: NodeId | None = None) -> Node:
        """Count one lookup of *entry*.

        The union gives one entry per file, so a node's entry only changes when its number
        now names another file (a removed directory's number on a new one, say).
        """
        if node_id is None:
            node_id = self.id_for(entry)
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = Node(node_id, entry)
            self.peak = max(self.peak, len(self._nodes))
        elif node.entry is not entry:
            log.debug("node %d now shows %r instead of %r", node_id, entry, node.entry)
            old = node.entry
            node.entry = entry
            if isinstance(old, Directory):
                self._fds.discard(old)
                self._on_replaced(node_id)
        node.lookups += 1
        return node

    def forget(self, node_id: int, count: int) -> None:
        node = self._nodes.get(NodeId(node_id))
        if node is None or node.id == ROOT_ID:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self._nodes[node.id]
            if isinstance(node.entry, Directory):
                self._fds.discard(node.entry)

    def shrink(self) -> None:
        """A dict keeps the size it grew to: one that held 100k nodes and holds a few costs
        megabytes until built again."""
        self._nodes = dict(self._nodes)
        self.peak = len(self._nodes)

    def all(self) -> list[Node]:
        return list(self._nodes.values())

    def rehome(self, found: Mapping[Entry, Entry], root: Directory) -> None:
        """The union found its files again (`Union.refresh`): each node shows its file's new
        entry; a node whose file is gone keeps the retired one until the kernel forgets it."""
        for node in self._nodes.values():
            if node.id == ROOT_ID:
                node.entry = root
            elif (entry := found.get(node.entry)) is not None:
                node.entry = entry
