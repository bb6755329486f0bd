"""The rollout server: the HTTP app and its routes (http_server, *_routes), request parsing (*schemas),
the HTTP process's client of the engine (engine_client, composed of engine_link, engine_status, request_table,
generate_call, control_channel and generate_normalizer), the engine process and its ZeroMQ wire format
(engine_process, ipc), and the command line (launch_server, run as `python -m rollout.launch_server`).

Imports point down: rollout.server -> runtime -> kernels, and sync for the weight-update errors and
dtypes. Nothing here imports the client library (rollout.client).
"""
