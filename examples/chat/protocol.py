"""The chat example's packets, declared once for the server and the bots
(`servercore gen protocol.py -o out/` would give a C# client the same)."""

from __future__ import annotations

from typing import Annotated

from servercore.packets import Max, Packet


class Login(Packet, id=1):
    name: Annotated[str, Max(32)]


class Join(Packet, id=2):
    room: Annotated[str, Max(32)]


class Say(Packet, id=3):
    text: Annotated[str, Max(500)]


class Said(Packet, id=4):
    """Someone in your room said something."""

    name: Annotated[str, Max(32)]
    text: Annotated[str, Max(500)]


class Welcome(Packet, id=5):
    """The server's answer to Join: who is in the room."""

    room: Annotated[str, Max(32)]
    members: Annotated[list[str], Max(1000)]
