"""The FUSE inode table: node ids, lookup counts, forget.

pyfuse3 uses one number as the FUSE node id and as the st_ino that stat shows, so node ids are
the union's inode numbers (`Union.inode_number`: derived from real inode numbers, kept across
copy-up), never a counter: hard links of one file are one node, and a remount gives the same ids.
"""

import errno
import logging
import os
from typing import NewType

from cowfs.lookup import Directory, DirectoryFds, Entry
from cowfs.union import ROOT_INO, Union

log = logging.getLogger(__name__)

NodeId = NewType("NodeId", int)   # FUSE node id, which is also st_ino
ROOT_ID = NodeId(ROOT_INO)        # FUSE_ROOT_ID: the kernel's name for the mount's root


class Node:
    __slots__ = ("entry", "id", "lookups", "pinned_fd")

    def __init__(self, node_id: NodeId, entry: Entry) -> None:
        self.id = node_id
        self.entry = entry
        self.lookups = 0      # how many times the kernel was told of this node, less forgets
        # An O_PATH fd on a removed entry's file: stat still answers while the kernel holds it.
        self.pinned_fd: int | None = None

    def pin(self, union: Union) -> None:
        """Keep the entry's file reachable after its name goes (unlink, rmdir, rename over it).

        It also keeps the inode allocated, so the upper filesystem cannot give its number to a
        new file while the kernel still knows this node by it.
        """
        if self.pinned_fd is not None:
            return
        if isinstance(self.entry, Directory):
            self.pinned_fd = os.dup(union.fds.fd(self.entry, self.entry.layer))
            return
        directory_fd, name = self.entry.location(union.fds)
        self.pinned_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=directory_fd)

    def unpin(self) -> None:
        if self.pinned_fd is not None:
            os.close(self.pinned_fd)
            self.pinned_fd = None


class InodeTable:
    """The nodes the kernel knows, by id; each lives until the kernel forgets it."""

    def __init__(self, union: Union, fds: DirectoryFds) -> None:
        self._union = union
        self._fds = fds
        self._nodes: dict[NodeId, Node] = {ROOT_ID: Node(ROOT_ID, union.root)}

    def id_for(self, entry: Entry) -> NodeId:
        return NodeId(self._union.inode_number(entry))

    def get(self, node_id: int) -> Node:
        try:
            return self._nodes[NodeId(node_id)]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown node {node_id}") from None

    def find(self, entry: Entry) -> Node | None:
        """The node of *entry*, if the kernel knows it."""
        node = self._nodes.get(self.id_for(entry))
        return node if node is not None and node.entry is entry else None

    def remember(self, entry: Entry, node_id: NodeId | None = None) -> Node:
        """Count one lookup of *entry*.

        A node keeps its entry while that stays in the tree (another name of a hard-linked
        file is the same node); a removed entry gives way to the living one.
        """
        if node_id is None:
            node_id = self.id_for(entry)
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = Node(node_id, entry)
        elif node.entry is not entry and (node.entry.removed or entry.is_directory):
            old = node.entry
            node.entry = entry
            node.unpin()
            if isinstance(old, Directory):
                self._fds.discard(old)
        node.lookups += 1
        return node

    def forget(self, node_id: int, count: int) -> None:
        node = self._nodes.get(NodeId(node_id))
        if node is None or node.id == ROOT_ID:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self._nodes[node.id]
            node.unpin()
            if isinstance(node.entry, Directory):
                self._fds.discard(node.entry)
