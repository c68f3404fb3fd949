// Package client is a Go client of the agent's REST API, used by the
// `redis-agent status` command and by a broker. It speaks the wire types of
// apitype and imports nothing of the agent itself. It also renders
// instances as a status table, like `supervisorctl status`.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
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

// Error is an error answer of the agent: its status and its body.
type Error struct {
	Status      int
	Code        string
	Description string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Description)
}

// IsStatus reports whether err is an answer of the agent with HTTP status
// code.
func IsStatus(err error, code int) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == code
}

// do sends a request with a JSON body (when in is not nil) and decodes a
// JSON answer into out (when not nil). It returns the status of a 2xx
// answer, and an *Error for any other.
func (c *Client) do(ctx context.Context, method, path string, in, out any) (int, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.Base+path, body)
	if err != nil {
		return 0, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return 0, err
	}
	if resp.StatusCode >= 300 {
		return resp.StatusCode, errorOf(resp.StatusCode, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: decode the answer: %w", method, path, err)
		}
	}
	return resp.StatusCode, nil
}

func instancePath(id string) string { return "/v1/instances/" + url.PathEscape(id) }

// List returns every instance.
func (c *Client) List(ctx context.Context) ([]apitype.Instance, error) {
	var out apitype.InstanceList
	_, err := c.do(ctx, http.MethodGet, "/v1/instances", nil, &out)
	return out.Instances, err
}

// Get returns instance id.
func (c *Client) Get(ctx context.Context, id string) (apitype.Instance, error) {
	var out apitype.Instance
	_, err := c.do(ctx, http.MethodGet, instancePath(id), nil, &out)
	return out, err
}

// Provision creates instance id; created is false when an identical one
// existed.
func (c *Client) Provision(ctx context.Context, id string, spec apitype.Spec) (inst apitype.Instance, created bool, err error) {
	code, err := c.do(ctx, http.MethodPut, instancePath(id), spec, &inst)
	return inst, code == http.StatusCreated, err
}

// Deprovision deletes instance id. Deleting what is absent (410) is not an
// error.
func (c *Client) Deprovision(ctx context.Context, id string) error {
	_, err := c.do(ctx, http.MethodDelete, instancePath(id), nil, nil)
	if IsStatus(err, http.StatusGone) {
		return nil
	}
	return err
}

// Resize changes instance id's maxmemory, live.
func (c *Client) Resize(ctx context.Context, id string, memoryMB int) (apitype.Instance, error) {
	var out apitype.Instance
	_, err := c.do(ctx, http.MethodPatch, instancePath(id), apitype.Resize{MemoryMB: &memoryMB}, &out)
	return out, err
}

// Update resizes instance id, changes its settings, replaces its
// metadata, or several at once.
func (c *Client) Update(ctx context.Context, id string, u apitype.Resize) (apitype.Instance, error) {
	var out apitype.Instance
	_, err := c.do(ctx, http.MethodPatch, instancePath(id), u, &out)
	return out, err
}

func bindingPath(id, bid string) string { return instancePath(id) + "/bindings/" + url.PathEscape(bid) }

// Bind creates (or returns again) binding bid of instance id. password,
// when not empty, is the binding's password (a move keeps it).
func (c *Client) Bind(ctx context.Context, id, bid, password string) (creds apitype.Credentials, created bool, err error) {
	code, err := c.do(ctx, http.MethodPut, bindingPath(id, bid), apitype.BindRequest{Password: password}, &creds)
	return creds, code == http.StatusCreated, err
}

// Binding returns the credentials of binding bid of instance id.
func (c *Client) Binding(ctx context.Context, id, bid string) (apitype.Credentials, error) {
	var out apitype.Credentials
	_, err := c.do(ctx, http.MethodGet, bindingPath(id, bid), nil, &out)
	return out, err
}

// Snapshot starts the download of a fresh RDB of instance id; the caller
// reads and closes body. sha256 is the agent's hex digest of it.
func (c *Client) Snapshot(ctx context.Context, id string) (body io.ReadCloser, sha256 string, err error) {
	resp, err := c.raw(ctx, http.MethodGet, instancePath(id)+"/snapshot", nil, "", nil, -1)
	if err != nil {
		return nil, "", err
	}
	return resp.Body, resp.Header.Get(apitype.SnapshotSHA256Header), nil
}

// CA returns the PEM certificate of the CA that signs the agent's
// instances' TLS certificates (GET /v1/ca).
func (c *Client) CA(ctx context.Context) ([]byte, error) {
	resp, err := c.raw(ctx, http.MethodGet, "/v1/ca", nil, "", nil, -1)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(io.LimitReader(resp.Body, 1<<20))
}

// Configure changes instance id's settings (eviction policy, clients'
// memory bound, TLS), live.
func (c *Client) Configure(ctx context.Context, id string, set apitype.Settings) (apitype.Instance, error) {
	return c.Update(ctx, id, apitype.Resize{Settings: set})
}

// Restore replaces instance id's data with the RDB read from rdb (size
// bytes, or -1 when unknown), checked against sha256 when given.
func (c *Client) Restore(ctx context.Context, id string, rdb io.Reader, size int64, sha256 string) (apitype.Instance, error) {
	h := http.Header{}
	if sha256 != "" {
		h.Set(apitype.SnapshotSHA256Header, sha256)
	}
	resp, err := c.raw(ctx, http.MethodPut, instancePath(id)+"/snapshot", rdb, "application/octet-stream", h, size)
	if err != nil {
		return apitype.Instance{}, err
	}
	defer resp.Body.Close()
	var out apitype.Instance
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&out); err != nil {
		return out, fmt.Errorf("restore %s: decode the answer: %w", id, err)
	}
	return out, nil
}

// RestoreBackup replaces instance id's data with the backup at key in
// the agent's bucket.
func (c *Client) RestoreBackup(ctx context.Context, id, key string) (apitype.Instance, error) {
	b, _ := json.Marshal(apitype.RestoreRequest{FromBackup: key})
	return c.transferJSON(ctx, http.MethodPut, instancePath(id)+"/snapshot", b)
}

// Backup takes a backup of instance id now and returns it once it is in
// the bucket.
func (c *Client) Backup(ctx context.Context, id string) (apitype.Backup, error) {
	resp, err := c.raw(ctx, http.MethodPost, instancePath(id)+"/backups", nil, "", nil, -1)
	if err != nil {
		return apitype.Backup{}, err
	}
	defer resp.Body.Close()
	var out apitype.Backup
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&out); err != nil {
		return out, fmt.Errorf("backup %s: decode the answer: %w", id, err)
	}
	return out, nil
}

// Backups lists what the bucket holds of instance id, oldest first.
func (c *Client) Backups(ctx context.Context, id string, details bool) ([]apitype.Backup, error) {
	path := instancePath(id) + "/backups"
	if details {
		path += "?details=true"
	}
	var out apitype.BackupList
	_, err := c.do(ctx, http.MethodGet, path, nil, &out)
	return out.Backups, err
}

// LatestBackups is each instance's latest backup in the agent's bucket,
// with its manifest; agent, when set, keeps those that agent took.
func (c *Client) LatestBackups(ctx context.Context, agent string) ([]apitype.Backup, error) {
	path := "/v1/backups"
	if agent != "" {
		path += "?agent=" + url.QueryEscape(agent)
	}
	resp, err := c.raw(ctx, http.MethodGet, path, nil, "", nil, -1)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out apitype.BackupList
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&out); err != nil {
		return nil, fmt.Errorf("list backups: decode the answer: %w", err)
	}
	return out.Backups, nil
}

// transferJSON sends a JSON body on the transfers client (no overall
// timeout) and decodes an Instance.
func (c *Client) transferJSON(ctx context.Context, method, path string, body []byte) (apitype.Instance, error) {
	resp, err := c.raw(ctx, method, path, bytes.NewReader(body), "application/json", nil, int64(len(body)))
	if err != nil {
		return apitype.Instance{}, err
	}
	defer resp.Body.Close()
	var out apitype.Instance
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&out); err != nil {
		return out, fmt.Errorf("%s %s: decode the answer: %w", method, path, err)
	}
	return out, nil
}

// raw sends a request with body as it is and returns a 2xx response for
// the caller to read and close; any other answer is an *Error. size, when
// not negative, is the body's length.
func (c *Client) raw(ctx context.Context, method, path string, body io.Reader, contentType string, h http.Header, size int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.Base+path, body)
	if err != nil {
		return nil, err
	}
	for k, v := range h {
		req.Header[k] = v
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if size >= 0 {
		req.ContentLength = size
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.transfers().Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return nil, errorOf(resp.StatusCode, b)
	}
	return resp, nil
}

// transfers is the HTTP client for snapshots: the same transport, no
// overall timeout (a large data set takes as long as it takes; ctx bounds
// it).
func (c *Client) transfers() *http.Client {
	hc := *c.HTTP
	hc.Timeout = 0
	return &hc
}

// errorOf builds the *Error of a non-2xx answer.
func errorOf(status int, b []byte) *Error {
	e := &Error{Status: status}
	var body apitype.Error
	if json.Unmarshal(b, &body) == nil && body.Code != "" {
		e.Code, e.Description = body.Code, body.Description
	} else {
		e.Code, e.Description = http.StatusText(status), strings.TrimSpace(string(b))
	}
	return e
}

// Unbind deletes binding bid of instance id. Deleting what is absent
// (410) is not an error.
func (c *Client) Unbind(ctx context.Context, id, bid string) error {
	_, err := c.do(ctx, http.MethodDelete, bindingPath(id, bid), nil, nil)
	if IsStatus(err, http.StatusGone) {
		return nil
	}
	return err
}

// Capacity returns the agent's room for new instances.
func (c *Client) Capacity(ctx context.Context) (apitype.Capacity, error) {
	var out apitype.Capacity
	_, err := c.do(ctx, http.MethodGet, "/v1/capacity", nil, &out)
	return out, err
}

// SetDraining sets or clears the agent's drain mark.
func (c *Client) SetDraining(ctx context.Context, on bool) error {
	method := http.MethodPut
	if !on {
		method = http.MethodDelete
	}
	_, err := c.do(ctx, method, "/v1/drain", nil, nil)
	return err
}

// StartMove makes instance id the source of a replication move and
// returns how its replica logs in.
func (c *Client) StartMove(ctx context.Context, id string) (apitype.Primary, error) {
	var out apitype.Primary
	_, err := c.do(ctx, http.MethodPost, instancePath(id)+"/move", nil, &out)
	return out, err
}

// Replication returns instance id's role and replication offset.
func (c *Client) Replication(ctx context.Context, id string) (apitype.Replication, error) {
	var out apitype.Replication
	_, err := c.do(ctx, http.MethodGet, instancePath(id)+"/replication", nil, &out)
	return out, err
}

// Cutover pauses the source's writes for at most timeout, fences its
// tenants off and returns its final replication offset.
func (c *Client) Cutover(ctx context.Context, id string, timeout time.Duration) (int64, error) {
	var out apitype.Cutover
	_, err := c.do(ctx, http.MethodPost, instancePath(id)+"/move/cutover", apitype.Cutover{TimeoutMS: int(timeout.Milliseconds())}, &out)
	return out.Offset, err
}

// Promote makes a move's target a primary once it reached offset.
func (c *Client) Promote(ctx context.Context, id string, offset int64, timeout time.Duration) error {
	_, err := c.do(ctx, http.MethodPost, instancePath(id)+"/promote", apitype.Promote{Offset: offset, TimeoutMS: int(timeout.Milliseconds())}, nil)
	return err
}

// Forward replaces the source's redis-server by a forwarder to host:port
// for ttl.
func (c *Client) Forward(ctx context.Context, id, host string, port int, ttl time.Duration) error {
	_, err := c.do(ctx, http.MethodPost, instancePath(id)+"/move/forward", apitype.Forward{Host: host, Port: port, TTLSeconds: int(ttl.Seconds())}, nil)
	return err
}

// AbortMove puts a move's source back as it was.
func (c *Client) AbortMove(ctx context.Context, id string) error {
	_, err := c.do(ctx, http.MethodDelete, instancePath(id)+"/move", nil, nil)
	return err
}

// StartRollout starts moving instances (all of them when none are named)
// to the agent's configured redis-server, one at a time.
func (c *Client) StartRollout(ctx context.Context, instances ...string) (apitype.Rollout, error) {
	var out apitype.Rollout
	_, err := c.do(ctx, http.MethodPost, "/v1/rollout", apitype.RolloutRequest{Instances: instances}, &out)
	return out, err
}

// RolloutStatus returns the progress of the agent's last rollout.
func (c *Client) RolloutStatus(ctx context.Context) (apitype.Rollout, error) {
	var out apitype.Rollout
	_, err := c.do(ctx, http.MethodGet, "/v1/rollout", nil, &out)
	return out, err
}

// Ready reports whether the agent's /readyz passes.
func (c *Client) Ready(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodGet, "/readyz", nil, nil)
	return err
}

// WriteStatus writes one line per instance: id, state, port, pid, uptime,
// restarts, memory used of max, disk its files take (data and logs) of its
// reservation, and the last exit when there was one.
func WriteStatus(w io.Writer, insts []apitype.Instance) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tPORT\tPID\tUPTIME\tRESTARTS\tMEMORY\tDISK\tLAST BACKUP\tEVICTION\tTLS\tLAST EXIT")
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
			why := e.Reason
			if e.Message != "" {
				why += ": " + e.Message
			}
			last = fmt.Sprintf("%s (%s) %s ago", why, how, time.Since(e.Time).Round(time.Second))
		}
		disk := "-"
		if d := in.Disk; d != nil {
			used := "-"
			if !d.MeasuredAt.IsZero() {
				used = Bytes(d.DataBytes + d.LogBytes)
			}
			disk = used + "/" + Bytes(d.ReservedBytes)
		}
		eviction := in.MaxmemoryPolicy
		if eviction == "" {
			eviction = "-"
		}
		// off, or the mode and the TLS port: "required:16001".
		tlsCell := "-"
		if in.TLS != "" && in.TLS != apitype.TLSOff {
			tlsCell = fmt.Sprintf("%s:%d", in.TLS, in.TLSPort)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", in.ID, in.State, in.Port, pid, uptime, in.Restarts, mem, disk, lastBackup(in.Backup), eviction, tlsCell, last)
	}
	return tw.Flush()
}

// lastBackup is the LAST BACKUP column: the last successful backup's age
// and size, and the failure since when there was one; "-" on an agent
// without a backup target.
func lastBackup(b *apitype.BackupStatus) string {
	if b == nil {
		return "-"
	}
	out := "never"
	if l := b.Last; l != nil {
		out = fmt.Sprintf("%s ago (%.1fMiB)", time.Since(l.Time).Round(time.Second), float64(l.Size)/(1<<20))
	}
	if b.LastError != "" {
		reason, _, _ := strings.Cut(b.LastError, ":")
		out += ", failing: " + reason
	}
	if b.Running {
		out += ", running"
	}
	return out
}

// Bytes writes n bytes in binary units: "512B", "1.5MiB", "3.0GiB".
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	v, i := float64(n)/unit, 0
	for v >= unit && i < 4 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f%ciB", v, "KMGTP"[i])
}
