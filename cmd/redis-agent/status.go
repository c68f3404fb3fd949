package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/redis-agent/redis-agent/client"
)

// status prints the running agent's instances as a table.
func status(args []string) error {
	var ev envs
	fs := flag.NewFlagSet("redis-agent status", flag.ContinueOnError)
	addr := fs.String("addr", ev.str("LISTEN", "127.0.0.1:7070"), "the agent's API address (env REDIS_AGENT_LISTEN)")
	tokenFile := fs.String("token-file", ev.str("TOKEN_FILE", ""), "file holding the API bearer token (env REDIS_AGENT_TOKEN_FILE or REDIS_AGENT_TOKEN)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	tok, err := token(*tokenFile)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	insts, err := client.New(*addr, tok).List(ctx)
	if err != nil {
		return fmt.Errorf("ask the agent at %s: %w", *addr, err)
	}
	return client.WriteStatus(os.Stdout, insts)
}
