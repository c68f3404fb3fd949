// Package client is a small Go client of the agent's REST API, used by the
// `redis-agent status` command and usable by a broker. It also renders
// instances as a status table, like `supervisorctl status`.
package client

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/redis-agent/redis-agent/agent"
)

// Client talks to one agent.
type Client struct {
	// Base is the agent's URL, e.g. http://127.0.0.1:7070.
	Base string
	// Token is the bearer token, if the agent wants one.
	Token string
	HTTP  *http.Client
}

// New returns a client of the agent at base.
func New(base, token string) *Client {
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	return &Client{Base: strings.TrimRight(base, "/"), Token: token, HTTP: &http.Client{Timeout: 30 * time.Second}}
}

// Error is an error answer of the agent.
type Error struct {
	Status      int
	Code        string `json:"error"`
	Description string `json:"description"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Description)
}

func (c *Client) get(ctx context.Context, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.Base+path, nil)
	if err != nil {
		return err
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		e := &Error{Status: resp.StatusCode}
		if json.Unmarshal(body, e) != nil || e.Code == "" {
			e.Code, e.Description = http.StatusText(resp.StatusCode), strings.TrimSpace(string(body))
		}
		return e
	}
	return json.Unmarshal(body, out)
}

// List returns every instance.
func (c *Client) List(ctx context.Context) ([]agent.Instance, error) {
	var out struct {
		Instances []agent.Instance `json:"instances"`
	}
	err := c.get(ctx, "/v1/instances", &out)
	return out.Instances, err
}

// WriteStatus writes one line per instance: id, state, port, pid, uptime,
// restarts, memory used of max, and the last exit when there was one.
func WriteStatus(w io.Writer, insts []agent.Instance) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tPORT\tPID\tUPTIME\tRESTARTS\tMEMORY\tLAST EXIT")
	for _, in := range insts {
		pid, uptime := "-", "-"
		if in.PID != 0 {
			pid = fmt.Sprint(in.PID)
			uptime = (time.Duration(in.UptimeSeconds) * time.Second).String()
		}
		mem := fmt.Sprintf("-/%dMiB", in.MemoryMB)
		if in.MemoryUsedBytes > 0 {
			mem = fmt.Sprintf("%.1fMiB/%dMiB", float64(in.MemoryUsedBytes)/(1<<20), in.MemoryMB)
		}
		last := "-"
		if e := in.LastExit; e != nil {
			how := fmt.Sprintf("code %d", e.Code)
			if e.Signal != "" {
				how = e.Signal
			}
			last = fmt.Sprintf("%s (%s) %s ago", e.Reason, how, time.Since(e.Time).Round(time.Second))
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%s\t%s\n", in.ID, in.State, in.Port, pid, uptime, in.Restarts, mem, last)
	}
	return tw.Flush()
}
