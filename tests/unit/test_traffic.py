"""route_counts: per-route request and error counts out of `show stat` CSV."""

from __future__ import annotations

from flowproxy.haproxy.traffic import route_counts

HEAD = "# pxname,svname,stot,hrsp_4xx,hrsp_5xx,econ,eresp,\n"


def test_backend_rows_add_up_per_route_and_name_the_busiest_variant() -> None:
    stat = HEAD + "".join([
        "fp_http,FRONTEND,900,0,0,,,\n",
        "api:blue,BACKEND,10,1,2,0,0,\n",
        "api:blue,10.0.0.1:80,10,1,2,0,0,\n",
        "api:green,BACKEND,90,0,3,1,1,\n",
        "web::canary,BACKEND,7,0,0,0,0,\n",
        "fp_no_route,BACKEND,4,4,0,0,0,\n",
    ])
    assert route_counts(stat) == {
        "api": {"variant": "green", "requests": 100, "4xx": 1, "5xx": 5, "conn_errors": 1, "resp_errors": 1},
        "web": {"variant": "canary", "requests": 7, "4xx": 0, "5xx": 0, "conn_errors": 0, "resp_errors": 0},
    }


def test_a_spare_counts_for_the_route_it_holds() -> None:
    stat = ("# pxname,svname,stot,hrsp_4xx,hrsp_5xx,econ,eresp\n"
            "fp_spare_http_00,BACKEND,7,1,0,0,0\nfp_spare_http_01,BACKEND,3,0,0,0,0\n")
    assert route_counts(stat, {"fp_spare_http_00": "new:live"}) == {
        "new": {"variant": "live", "requests": 7, "4xx": 1, "5xx": 0, "conn_errors": 0, "resp_errors": 0}}
