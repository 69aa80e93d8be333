"""Where the DaemonSet runs, in the default rendering and the gateway-only overlay.

Schema validation of every rendering (this overlay included) is in test_manifests.py;
these tests pin the scheduling contract of issue 12: by default every Linux node,
whatever its taints; the overlay only labelled gateway nodes.
"""

from __future__ import annotations

from typing import Any

from tests.unit.test_manifests import MANIFESTS, OVERLAYS, kustomizations, render

GATEWAY_ONLY = OVERLAYS / "gateway-only"


def shipper_pod_spec(kdir: Any) -> dict[str, Any]:
    ds = [o for o in render(kdir) if o["kind"] == "DaemonSet"]
    assert len(ds) == 1, [o["metadata"]["name"] for o in ds]
    spec: dict[str, Any] = ds[0]["spec"]["template"]["spec"]
    return spec


class TestScheduling:
    def test_default_runs_on_every_linux_node(self) -> None:
        """manifests/ selects only kubernetes.io/os=linux and tolerates every taint."""
        spec = shipper_pod_spec(MANIFESTS)
        assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
        assert spec["tolerations"] == [{"operator": "Exists"}]
        assert "affinity" not in spec

    def test_gateway_only_overlay_adds_the_gateway_label(self) -> None:
        """overlays/gateway-only keeps the Linux selector and tolerations and adds
        kube-ovn/role=gateway."""
        assert GATEWAY_ONLY in kustomizations()  # so test_manifests validates it too
        spec = shipper_pod_spec(GATEWAY_ONLY)
        assert spec["nodeSelector"] == {"kubernetes.io/os": "linux",
                                        "kube-ovn/role": "gateway"}
        assert spec["tolerations"] == [{"operator": "Exists"}]

    def test_overlay_changes_nothing_else(self) -> None:
        """Apart from the nodeSelector, the overlay renders the same objects as the default."""
        def without_selector(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
            out = []
            for o in objs:
                if o["kind"] == "DaemonSet":
                    o = {**o, "spec": {**o["spec"], "template": {
                        **o["spec"]["template"],
                        "spec": {k: v for k, v in o["spec"]["template"]["spec"].items()
                                 if k != "nodeSelector"}}}}
                out.append(o)
            return out

        assert without_selector(render(GATEWAY_ONLY)) == without_selector(render(MANIFESTS))
