package broker

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the broker's figures, on a registry of its own.
type metrics struct {
	reg               *prometheus.Registry
	requests          *prometheus.CounterVec
	placements        *prometheus.CounterVec
	placementFailures prometheus.Counter
	duplicates        prometheus.Counter
	moves             *prometheus.CounterVec
	opDuration        *prometheus.HistogramVec
}

func newMetrics(b *Broker) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "redis_broker_requests_total",
			Help: "HTTP requests, by route and status code.",
		}, []string{"route", "code"}),
		placements: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "redis_broker_placements_total",
			Help: "Instances placed, by agent (new ones and moves' targets).",
		}, []string{"agent"}),
		placementFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "redis_broker_placement_failures_total",
			Help: "Placements that found no agent with room.",
		}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "redis_broker_duplicate_instances_total",
			Help: "Instances found on more than one agent that the broker could not settle by itself.",
		}),
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "redis_broker_moves_total",
			Help: "Instances moved to another agent, by how (replication, snapshot).",
		}, []string{"method"}),
		opDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "redis_broker_operation_duration_seconds",
			Help:    "Duration of successful provisions, updates, deprovisions and moves.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300},
		}, []string{"operation"}),
	}
	for _, a := range b.fleet.agents {
		m.placements.WithLabelValues(a.cfg.Name)
	}
	m.moves.WithLabelValues("replication")
	m.moves.WithLabelValues("snapshot")
	m.reg.MustRegister(m.requests, m.placements, m.placementFailures, m.duplicates, m.moves, m.opDuration, &fleetCollector{b},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) observe(op string, start time.Time) {
	m.opDuration.WithLabelValues(op).Observe(time.Since(start).Seconds())
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// instrument counts the requests of route by status.
func (m *metrics) instrument(route string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		h.ServeHTTP(rec, r)
		m.requests.WithLabelValues(route, strconv.Itoa(rec.code)).Inc()
	})
}

type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.code = code
	r.ResponseWriter.WriteHeader(code)
}

var (
	descAgentUp = prometheus.NewDesc("redis_broker_agent_up",
		"1 when the agent answered the broker's last look.", []string{"agent", "zone"}, nil)
	descAgentReady = prometheus.NewDesc("redis_broker_agent_ready",
		"1 when the agent's /readyz passed at the broker's last look.", []string{"agent", "zone"}, nil)
	descAgentDraining = prometheus.NewDesc("redis_broker_agent_draining",
		"1 while the agent is drained: nothing new is placed there.", []string{"agent", "zone"}, nil)
	descAgentInstances = prometheus.NewDesc("redis_broker_agent_instances",
		"Instances the agent held at the broker's last look.", []string{"agent", "zone"}, nil)
	descAgentMemoryFree = prometheus.NewDesc("redis_broker_agent_memory_free_bytes",
		"Free memory budget of the agent at the broker's last look.", []string{"agent", "zone"}, nil)
	descAgentDiskAvailable = prometheus.NewDesc("redis_broker_agent_disk_available_bytes",
		"Disk of the agent that a new instance's reservation may take (its disk_available_bytes) at the broker's last look.", []string{"agent", "zone"}, nil)
)

// fleetCollector reports the fleet as the broker last saw it.
type fleetCollector struct{ b *Broker }

func (c *fleetCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descAgentUp, descAgentReady, descAgentDraining, descAgentInstances, descAgentMemoryFree, descAgentDiskAvailable} {
		ch <- d
	}
}

func (c *fleetCollector) Collect(ch chan<- prometheus.Metric) {
	b2f := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	for _, a := range c.b.fleet.agents {
		reachable, ready, draining, capa, _, n := a.snapshot()
		l := []string{a.cfg.Name, a.cfg.Zone}
		ch <- prometheus.MustNewConstMetric(descAgentUp, prometheus.GaugeValue, b2f(reachable), l...)
		ch <- prometheus.MustNewConstMetric(descAgentReady, prometheus.GaugeValue, b2f(ready), l...)
		ch <- prometheus.MustNewConstMetric(descAgentDraining, prometheus.GaugeValue, b2f(draining), l...)
		ch <- prometheus.MustNewConstMetric(descAgentInstances, prometheus.GaugeValue, float64(n), l...)
		ch <- prometheus.MustNewConstMetric(descAgentMemoryFree, prometheus.GaugeValue, float64(capa.MemoryFreeMB)*(1<<20), l...)
		ch <- prometheus.MustNewConstMetric(descAgentDiskAvailable, prometheus.GaugeValue, float64(capa.DiskAvailableBytes), l...)
	}
}
