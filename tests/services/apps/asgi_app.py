"""A starlette ASGI app, served by uvicorn in the tests (async endpoints: no thread pool)."""

import common
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route


async def work_view(request):
    return Response(common.work_body(int(request.query_params.get("n", "1"))))


async def probe_view(request):
    return Response(common.probe_body())


app = Starlette(routes=[Route("/work", work_view), Route("/probe", probe_view)])
