"""The query client, importable with ``pip install 'ebrflow[client]'`` alone (pymilvus and numpy, no trainer)::

from ebrflow.client import QueryClient

client = QueryClient.from_uri("http://127.0.0.1:19530", prefix="ebrflow", prior_coordinate=True)
client.recommend_many([1, 2, 3], k=10, filter="version >= {v}", filter_params={"v": 100}, on_unknown="popular")
"""

from ebrflow.indexer.query import NothingServed, QueryClient, Recommendation, UnknownUser

__all__ = ["NothingServed", "QueryClient", "Recommendation", "UnknownUser"]
