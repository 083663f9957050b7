"""What the tests and the benchmarks run the system on: a private database and vhost, the
services as real processes, and loopback stand-ins for the webhook and the OpenAI API. Neither
`tests` nor `bench` imports the other; both stand on this."""
