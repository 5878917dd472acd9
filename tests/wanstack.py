"""The seed-003 VPN topology on one machine, with a `WanLink` as the VPN.

    hospital side (loopback, no delay)          centre side, behind the link
    source PACS HOSPITAL ──C-STORE── link ──▶  destination DEST (DICOM port)
    controller + local Orthanc CENTRE ─REST─ link ──▶  DEST (HTTP port)
    CENTRE ──C-FIND/C-MOVE──▶ HOSPITAL (loopback)

The PACS knows DEST at the link's DICOM port, and the controller's `destination.url` is
the link's HTTP port: the C-STOREs and the proof of arrival both cross it, while the
controller drives its local Orthanc and the PACS without delay. One `WanLink` carries
both ports (shared rate clock, one cut for both).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanlink import WanLink, WanLinkProcess

from dicom_transfer.stack import (
    CENTRE_AET,
    DEST_AET,
    HOST,
    PACS_AET,
    OrthancProcess,
    OrthancSpec,
    Stack,
    launch_orthanc,
)


@dataclass
class WanStack:
    """A "separate" stack whose destination sits behind `link`."""

    stack: Stack
    link: WanLink | WanLinkProcess
    dest_dicom_port: int  # the link's port for DEST's DICOM port
    dest_url: str  # the link's port for DEST's REST API

    @property
    def dest(self) -> OrthancProcess:
        assert self.stack.dest is not None
        return self.stack.dest

    def config_yaml(self, path: Path, **transfer: Any) -> Path:
        """A transfer.yaml: local = CENTRE directly, destination DEST through the link."""
        path.write_text(
            f"local: {{url: {self.stack.centre.url}}}\n"
            "source: {modality: PACS}\n"
            f"destination: {{aet: {DEST_AET}, url: '{self.dest_url}'}}\n"
            "transfer: {" + ", ".join(f"{k}: {v}" for k, v in transfer.items()) + "}\n"
        )
        return path


@contextmanager
def wan_stack(
    workdir: Path,
    rtt_ms: float,
    mbit: float | None,
    *,
    extra_config: dict[str, Any] | None = None,
    ready_timeout_s: float = 30,
    link_process: bool = False,
) -> Iterator[WanStack]:
    """Start the link, then PACS, CENTRE and DEST (killed on exit, the link stopped).

    `link_process`: the link runs in a process of its own (`WanLinkProcess`), for a
    benchmark whose PACS shares its interpreter; it records no connections then.
    """
    pacs_spec = OrthancSpec.plan("pacs", PACS_AET)
    centre_spec = OrthancSpec.plan("centre", CENTRE_AET)
    dest_spec = OrthancSpec.plan("dest", DEST_AET)
    kind = WanLinkProcess if link_process else WanLink
    link = kind(HOST, dest_spec.dicom_port, rtt_ms=rtt_ms, mbit=mbit, dicom=True).start()
    processes: list[OrthancProcess] = []
    try:
        http_port = link.add_target(HOST, dest_spec.http_port)
        dest_via_link = (DEST_AET, HOST, link.port)
        plans = [
            (pacs_spec, {"DEST": dest_via_link}),
            (centre_spec, {"PACS": pacs_spec.modality, "DEST": dest_via_link}),
            (dest_spec, {"PACS": pacs_spec.modality}),
        ]
        for spec, modalities in plans:
            processes.append(launch_orthanc(spec, workdir, modalities, extra_config=extra_config))
        for process in processes:
            process.wait_ready(ready_timeout_s)
        stack = Stack(pacs=processes[0], centre=processes[1], dest=processes[2], topology="separate")
        yield WanStack(stack, link, link.port, f"http://{HOST}:{http_port}")
    finally:
        for process in processes:
            process.kill()  # throw-away data: no orderly shutdown needed
        link.stop()
