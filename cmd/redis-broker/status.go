package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/redis-agent/redis-agent/broker"
)

// status prints the fleet as GET /admin/agents shows it, one line per
// agent.
func status(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("redis-broker status", flag.ContinueOnError)
	fs.SetOutput(out)
	addr := fs.String("broker", env("URL", "http://127.0.0.1:7080"), "the broker's URL (env REDIS_BROKER_URL)")
	user := fs.String("admin-username", env("ADMIN_USERNAME", "admin"), "admin user (env REDIS_BROKER_ADMIN_USERNAME)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodGet, strings.TrimRight(*addr, "/")+"/admin/agents", nil)
	if err != nil {
		return err
	}
	req.SetBasicAuth(*user, strings.TrimSpace(os.Getenv("REDIS_BROKER_ADMIN_PASSWORD")))
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /admin/agents: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var list broker.AgentList
	if err := json.Unmarshal(body, &list); err != nil {
		return err
	}
	return writeFleet(out, list)
}

func writeFleet(w io.Writer, list broker.AgentList) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "AGENT\tZONE\tSTATE\tINSTANCES\tMEMORY FREE\tPORTS FREE\tREDIS\tURL")
	for _, a := range list.Agents {
		state := "ready"
		switch {
		case !a.Reachable:
			state = "unreachable"
		case !a.Ready:
			state = "not ready"
		case a.Draining:
			state = "draining"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d/%dMiB\t%d/%d\t%s\t%s\n", a.Name, or(a.Zone, "-"), state, len(a.Instances),
			a.Capacity.MemoryFreeMB, a.Capacity.MemoryTotalMB, a.Capacity.PortsFree, a.Capacity.PortsTotal, or(a.Capacity.RedisVersion, "-"), a.URL)
	}
	return tw.Flush()
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
