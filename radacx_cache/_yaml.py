"""Plain YAML data for configs from anywhere: the safe loader, without aliases and without a key given
twice (a config file is untrusted input: an 80-line alias bomb expands without limit, and a repeated
key silently keeps the last value)."""
from __future__ import annotations

import yaml


class _NoAliasLoader(yaml.SafeLoader):
    """Plain YAML data without anchors and aliases: an 80-line alias bomb expands without limit."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"alias *{event.anchor} at line {event.start_mark.line + 1}: YAML aliases "
                                 f"are refused (write the value out)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:  # a key given twice: which one was meant cannot be known
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.YAMLError(f"key {key!r} at line {key_node.start_mark.line + 1} is already defined at "
                                     f"line {seen[key]}")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def plain_yaml(text: str):
    loader = _NoAliasLoader(text)  # what yaml.load does, with the safe loader that refuses aliases
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
