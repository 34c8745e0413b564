"""Many clients at once on the tiny server (16 sequences at most, a 24-block KV pool): every streaming
client gets exactly its own sequential greedy result, nothing lost, nothing mixed."""
import asyncio

NUM_CLIENTS = 32


def _request(i: int) -> dict:
    prompt = [(7 * i + 3 * j) % 300 + 5 for j in range(2 + i % 11)]  # 2 to 12 tokens, distinct
    return dict(model="tiny", prompt=prompt, max_tokens=6 + i % 17, temperature=0)


async def _stream(client, request: dict):
    text, reasons, usage = "", [], None
    stream = await client.completions.create(stream=True, stream_options={"include_usage": True}, **request)
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            assert choice.index == 0
            text += choice.text
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    return text, reasons, usage.completion_tokens


async def _all_at_once(server, requests):
    client = server.async_client()
    try:
        return await asyncio.gather(*(_stream(client, r) for r in requests))
    finally:
        await client.close()


def test_concurrent_streaming_clients_each_get_their_sequential_greedy_output(tiny_server):
    requests = [_request(i) for i in range(NUM_CLIENTS)]
    client = tiny_server.client()
    expected = []
    for request in requests:
        out = client.completions.create(**request)
        expected.append((out.choices[0].text, [out.choices[0].finish_reason], out.usage.completion_tokens))
    assert len({e[0] for e in expected}) > NUM_CLIENTS // 2  # the prompts really differ
    assert asyncio.run(_all_at_once(tiny_server, requests)) == expected
    metrics = tiny_server.metrics()
    assert metrics["fastlm_kv_blocks_used"] == 0 and metrics["fastlm_requests_in_flight"] == 0
    assert metrics["fastlm_requests_running"] == metrics["fastlm_requests_waiting"] == 0
