"""The FUSE inode table: node ids, lookup counts, forget.

pyfuse3 uses one number as the FUSE node id and as the st_ino that stat shows, so node ids are
derived from real inode numbers, never from a counter: the entry's topmost copy's inode, so hard
links of one lower file are one node, and the same number comes back after a remount. Layers on
several filesystems get the filesystem's index in the top bits (the kernel's `xino` idea).
"""

import errno
import logging
import os
from typing import NewType

from cowfs.layers import LayerStack
from cowfs.lookup import Directory, DirectoryFds, Entry

log = logging.getLogger(__name__)

NodeId = NewType("NodeId", int)   # FUSE node id, which is also st_ino
ROOT_ID = NodeId(1)               # FUSE_ROOT_ID: the kernel's name for the mount's root
_ID_BITS = 64


class Node:
    __slots__ = ("entry", "id", "lookups")

    def __init__(self, node_id: NodeId, entry: Entry) -> None:
        self.id = node_id
        self.entry = entry
        self.lookups = 0      # how many times the kernel was told of this node, less forgets


class InodeNumbers:
    """Maps (st_dev, st_ino) of a layer file to the number the merged view shows."""

    def __init__(self, stack: LayerStack) -> None:
        devices = list(dict.fromkeys(layer.st_dev for layer in stack.layers))
        self._index = {device: index for index, device in enumerate(devices)}
        # One spare index above the layers' filesystems numbers what does not fit.
        self._bits = len(devices).bit_length()
        self._spare_index = (1 << self._bits) - 1
        self._shift = _ID_BITS - self._bits
        self._remapped: dict[tuple[int, int], NodeId] = {}

    def number(self, st: os.stat_result) -> NodeId:
        index = self._index.get(st.st_dev)
        if index is None and len(self._index) < self._spare_index:
            # A filesystem mounted inside a layer: numbered from now on, not across remounts.
            index = self._index[st.st_dev] = len(self._index)
        if index is not None and st.st_ino >> self._shift == 0:
            number = (index << self._shift) | st.st_ino
            if number > ROOT_ID:
                return NodeId(number)
        return self._remap(st)

    def _remap(self, st: os.stat_result) -> NodeId:
        key = (st.st_dev, st.st_ino)
        number = self._remapped.get(key)
        if number is None:
            if not self._remapped:
                log.warning("inode numbers of device %d do not fit; those may change at remount",
                            st.st_dev)
            number = NodeId((self._spare_index << self._shift) | (len(self._remapped) + 2))
            self._remapped[key] = number
        return number


class InodeTable:
    """The nodes the kernel knows, by id; each lives until the kernel forgets it."""

    def __init__(self, stack: LayerStack, fds: DirectoryFds, root: Directory) -> None:
        self.numbers = InodeNumbers(stack)
        self._fds = fds
        self._nodes: dict[NodeId, Node] = {ROOT_ID: Node(ROOT_ID, root)}

    def __len__(self) -> int:
        return len(self._nodes)

    def id_for(self, entry: Entry) -> NodeId:
        if entry.parent is None:
            return ROOT_ID
        return self.numbers.number(entry.stat)

    def get(self, node_id: int) -> Node:
        try:
            return self._nodes[NodeId(node_id)]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown node {node_id}") from None

    def remember(self, entry: Entry, node_id: NodeId | None = None) -> Node:
        """Count one lookup of *entry*; the newest entry of a node is where it is read from."""
        if node_id is None:
            node_id = self.id_for(entry)
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = Node(node_id, entry)
        elif node.entry is not entry:
            self._replace_entry(node, entry)
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

    def _replace_entry(self, node: Node, entry: Entry) -> None:
        old = node.entry
        node.entry = entry
        if isinstance(old, Directory) and old is not entry:
            self._fds.discard(old)
